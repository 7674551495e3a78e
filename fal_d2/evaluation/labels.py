"""The ground-truth class of a classification dataset dict, checked once for every evaluator."""
import operator
from typing import Sequence


def checked_label(input_: dict, class_names: Sequence[str], evaluator: str, dataset_name: str) -> int:
    """``input_["label"]`` as an int in [0, K), or an error naming the key, file and dataset."""
    where = f"{evaluator} on '{dataset_name}': dataset dict {input_.get('file_name', '')!r}"
    if "label" not in input_:
        raise KeyError(f"{where} has no 'label'.")
    label = operator.index(input_["label"])
    if not 0 <= label < len(class_names):
        raise ValueError(
            f"{where} has 'label' {label}, outside [0, {len(class_names)}) for the dataset's "
            f"{len(class_names)} thing_classes."
        )
    return label
