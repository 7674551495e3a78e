"""A FALClassifier as a traceable module: an image batch in, a dict of tensors out, so that the
model and its built-in explanation maps can be exported to TorchScript and run without Python.

Why not Detectron2's ``TracingAdapter`` around the model itself: the classifier's interface (a
list with one dict per image in, one dict per image out, ``pred_class`` a Python int, maps resized
image by image in Python) would be traced for one batch size, and its outputs would come back as
an unnamed flat tuple whose schema lives only in Python. :class:`TraceableClassifier` takes the
batch tensor the model computes on and returns named tensors, so the trace holds for any batch
size and any image size, and a C++ or Python consumer reads outputs by name.
"""
import warnings
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fal_d2.modeling import FALClassifier
from fal_d2.modeling.map_resize import min_max_per_image

__all__ = ["TraceableClassifier", "trace_classifier", "compare_with_eager", "MAP_KINDS"]

# The per-level outputs, named as in FALClassifier's inference dict, and what each holds.
MAP_KINDS = {
    "class_map": "class map of the predicted class, min-max scaled to [0, 1], at the input size",
    "attention": "attention map M in [0, 1], at the input size",
    "attention_raw": "attention map M at the level's resolution",
    "attention_scores": "the branch's own softmax over the classes",
    "explanation": "the explanation head's map of the predicted class in [0, 1], at the input size",
}


class TraceableClassifier(nn.Module):
    """
    A :class:`FALClassifier` with a tensor interface, for ``torch.jit.trace``.

    Input: ``images``, (N, 3, H, W), uint8 or float, 0-255, in the model's ``INPUT.FORMAT`` channel
    order, already resized as the model was trained (``INPUT.CLS.SIZE`` squares, as
    ``ClassificationDatasetMapper`` and ``FALPredictor`` do); normalisation and padding happen
    inside, as in the eager model. Output: ``{"scores": (N, K) softmax}``, for each attention
    level ``"<kind>/<level>"`` for the branch kinds of :data:`MAP_KINDS` and, for each level with
    an explanation head, ``"explanation/<level>"``: the eager model's per-image outputs, batched,
    with the maps at the input's size (the eager model's "original size").
    ``pred_class`` is left out: it is ``scores.argmax(1)``.
    """

    def __init__(self, model: FALClassifier):
        super().__init__()
        if not isinstance(model, FALClassifier):
            raise ValueError(f"only a FALClassifier can be exported, not a {type(model).__name__}")
        self.model = model

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        model = self.model
        # Under tracing these sizes are traced values, so padding and cropping follow the input.
        height, width = images.shape[-2:]
        pixels = (images.to(model.pixel_mean.dtype) - model.pixel_mean) / model.pixel_std
        divisor = model.backbone.size_divisibility
        if divisor > 1:  # zero padding after normalisation, as ImageList.from_tensors does
            pixels = F.pad(pixels, (0, (-width) % divisor, 0, (-height) % divisor))
        padded_size = pixels.shape[-2:]
        logits, attention, features = model.classify(
            pixels.contiguous(memory_format=model.memory_format))
        scores = logits.float().softmax(dim=1)
        outputs = {"scores": scores}
        predicted = scores.argmax(dim=1)
        for level, out in attention.items():
            class_map = out.class_map(predicted)[:, None]
            outputs[f"class_map/{level}"] = min_max_per_image(
                _to_input_size(class_map, padded_size, height, width))
            outputs[f"attention/{level}"] = _to_input_size(out.attention, padded_size, height, width)
            outputs[f"attention_raw/{level}"] = out.attention[:, 0]
            outputs[f"attention_scores/{level}"] = out.logits.float().softmax(dim=1)
        for level, maps in model.explanation_maps(features, predicted).items():
            outputs[f"explanation/{level}"] = _to_input_size(maps[:, None], padded_size, height,
                                                             width)
        return outputs


def _to_input_size(level_maps: torch.Tensor, padded_size, height, width) -> torch.Tensor:
    """(N, 1, h, w) level maps to (N, H, W): upsampled over the padded batch, then cropped to the
    image, as :func:`fal_d2.modeling.level_maps_to_images` does for an output size equal to the
    input's."""
    full = F.interpolate(level_maps.float(), size=padded_size, mode="bilinear", align_corners=False)
    return full[:, 0, :height, :width]


def trace_classifier(model: FALClassifier, sample_images: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace ``model`` (in eval mode, gradients off) on ``sample_images`` (see
    :class:`TraceableClassifier` for the input); the result returns a ``Dict[str, Tensor]``."""
    model.eval().requires_grad_(False)
    wrapper = TraceableClassifier(model)
    with torch.no_grad(), warnings.catch_warnings():
        # Detectron2's Conv2d tests ``x.numel() == 0 and self.training`` on every call; in eval
        # mode that is always False, so the value the trace records is right.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                module=r"detectron2\.layers\.wrappers")
        return torch.jit.trace(wrapper, sample_images, strict=False)


def compare_with_eager(traced: nn.Module, model: FALClassifier,
                       images: torch.Tensor) -> List[Tuple[str, float]]:
    """
    Run ``images`` through the traced module and through ``model``'s own inference (one dict per
    image, maps requested at the input size); return (output name, max absolute difference) for
    every output, so that an export that does not reproduce the eager model is caught.
    """
    with torch.no_grad():
        exported = traced(images)
        eager = model([{"image": image, "height": image.shape[-2], "width": image.shape[-1]}
                       for image in images])
    differences = []
    for name, tensor in exported.items():
        kind, _, level = name.partition("/")
        reference = torch.stack([out[kind][level] if level else out[kind] for out in eager])
        if reference.shape != tensor.shape:
            raise ValueError(f"exported {name} has shape {tuple(tensor.shape)}, the eager model's "
                             f"{tuple(reference.shape)}")
        differences.append((name, (tensor.float() - reference.float()).abs().max().item()))
    return differences
