"""Stacked image batches: one tensor crosses from the loader workers, the model sees per-image dicts."""
import torch
import torch.utils.data as torchdata

from fal_d2.data import stack_images, unstack_images


class _Images(torchdata.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, index):
        image = torch.full((3, 4, 5), index, dtype=torch.uint8)
        return {"image": image, "label": index, "file_name": f"{index}.jpg"}


def test_workers_send_one_tensor_and_the_trainer_gets_dicts():
    loader = torchdata.DataLoader(_Images(), batch_size=3, num_workers=2, collate_fn=stack_images)
    batches = list(map(unstack_images, loader))
    assert [[record["label"] for record in batch] for batch in batches] == [[0, 1, 2], [3, 4, 5]]
    for batch in batches:
        storages = {record["image"].untyped_storage().data_ptr() for record in batch}
        assert len(storages) == 1  # views of the one stacked tensor
        for record in batch:
            assert record["image"].shape == (3, 4, 5)
            assert torch.equal(record["image"], torch.full((3, 4, 5), record["label"], dtype=torch.uint8))
            assert record["file_name"] == f"{record['label']}.jpg"
