"""A DefaultPredictor that accepts any common image layout and resizes like the test mapper."""
import numpy as np

from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor


def to_bgr_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a grayscale, BGRA, 16-bit or float image to the HxWx3 uint8 BGR DefaultPredictor takes."""
    image = np.asarray(image)
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {image.dtype}; expected uint8, uint16 or float")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"unsupported image shape {image.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


class FALPredictor(DefaultPredictor):
    """``DefaultPredictor`` for FAL classifiers.

    Detectron2's predictor resizes by the shortest edge; a classifier is trained on exact
    ``INPUT.CLS.SIZE`` squares, so this one resizes the same way. It also accepts grayscale, BGRA,
    16-bit and float images. Returns the model's dict: ``scores``, ``pred_class``, ``class_map``
    (per level, the branch's class map of the predicted class: the explanation), ``attention``...
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        size = cfg.INPUT.CLS.SIZE
        self.aug = T.Resize((size, size))

    def __call__(self, original_image):
        return super().__call__(to_bgr_uint8(original_image))
