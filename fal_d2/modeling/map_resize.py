"""Bring level-resolution maps back to the input images' original sizes, and to [0, 1]."""
from collections import defaultdict
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


# A map whose values span less than this fraction of their magnitude counts as constant.
CONSTANT_RELATIVE_SPAN = 1e-5


def level_maps_to_images(
    level_maps: torch.Tensor,
    padded_size: Tuple[int, int],
    image_sizes: Sequence[Tuple[int, int]],
    output_sizes: Sequence[Tuple[int, int]],
    min_max: bool = False,
) -> List[torch.Tensor]:
    """Resize (N, h, w) maps computed on a padded batch to each image's original (height, width).

    A level's map covers the whole padded batch tensor, so it is first upsampled to the padded
    size, cropped to the image's own (resized) extent, then resized to the original image size.
    Images that share both sizes are resized together: per-image calls made inference of a
    batch of 128 launch hundreds of tiny kernels per level. With ``min_max``, each resized map is
    then scaled to [0, 1] (:func:`min_max_per_image`), also group by group.
    """
    full = F.interpolate(level_maps[:, None].float(), size=padded_size, mode="bilinear",
                         align_corners=False)
    groups = defaultdict(list)
    for i, sizes in enumerate(zip(image_sizes, output_sizes)):
        groups[tuple(map(tuple, sizes))].append(i)
    resized: List[torch.Tensor] = [None] * len(level_maps)
    for (image_size, output_size), indices in groups.items():
        cropped = full[indices, :, : image_size[0], : image_size[1]]
        maps = F.interpolate(cropped, size=output_size, mode="bilinear", align_corners=False)
        if min_max:
            maps = min_max_per_image(maps)
        for i, resized_map in zip(indices, maps[:, 0]):
            resized[i] = resized_map
    return resized



def min_max_per_image(maps: torch.Tensor) -> torch.Tensor:
    """
    (N, ...) maps scaled to [0, 1] per image, as CAM and Grad-CAM are shown. A constant map
    carries no localisation and becomes all zeros: as all ones it would keep the whole image and
    score a perfect Average Drop. "Constant" allows rounding: bilinear resizing of a constant map
    leaves noise of a few float32 steps, which must not be stretched to [0, 1].
    """
    flat = maps.float().flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    span = high - low
    rounding = CONSTANT_RELATIVE_SPAN * torch.maximum(low.abs(), high.abs())
    safe_span = span.clamp_min(torch.finfo(flat.dtype).tiny)
    return torch.where(span > rounding, (flat - low) / safe_span, 0.0).view_as(maps)
