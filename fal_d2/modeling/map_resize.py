"""Bring level-resolution maps back to the input image's original size."""
from typing import Tuple

import torch
import torch.nn.functional as F


def level_map_to_image(
    level_map: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
) -> torch.Tensor:
    """Resize a (h, w) map computed on a padded batch to one image's original (height, width).

    A level's map covers the whole padded batch tensor, so it is first upsampled to the padded
    size, cropped to the image's own (resized) extent, then resized to the original image size.
    """
    full = F.interpolate(level_map[None, None].float(), size=padded_size, mode="bilinear",
                         align_corners=False)
    cropped = full[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(cropped, size=output_size, mode="bilinear", align_corners=False)[0, 0]
