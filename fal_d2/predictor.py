"""A DefaultPredictor that loads its weights checked, accepts any common image layout in a
documented range and resizes like the test mapper.

Like Detectron2's ``DefaultPredictor``, it takes images in OpenCV's channel order: pass
``cv2.imread(path)`` as it is, and an RGB array (PIL, matplotlib) as ``rgb[:, :, ::-1]``. The
predictor turns BGR into the model's ``INPUT.FORMAT`` (RGB for our configs, as the dataset mapper
reads training images); an RGB array given unflipped is silently read with red and blue swapped.
"""
import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from fal_d2.checkpoint import load_weights
from fal_d2.data.image_folder import register_from_config


def _float_to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] when the maximum is at most 1, else [0, 255]; anything else fails, since clipping
    it would hand the model a different image (a 0-255 image clipped to 1 is white)."""
    if not np.isfinite(image).all():
        raise ValueError("the float image has NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 255.0:
        raise ValueError(f"float image values span [{low:g}, {high:g}]; accepted ranges are "
                         f"[0, 1] and [0, 255]")
    scale = np.float32(255.0 if high <= 1.0 else 1.0)
    return np.rint(image.astype(np.float32, copy=False) * scale).astype(np.uint8)


def to_bgr_uint8(image) -> np.ndarray:
    """
    Convert an image to the HxWx3 uint8 BGR that DefaultPredictor takes: what ``cv2.imread(p)``
    returns passes through unchanged.

    Layouts, as the ``cv2.imread`` flags give them: HxWx3 BGR (``IMREAD_COLOR``, the default),
    HxW or HxWx1 grayscale (``IMREAD_GRAYSCALE``; repeated to three channels), HxWx4 BGRA
    (``IMREAD_UNCHANGED`` on a PNG with alpha; alpha dropped). Types: uint8; uint16 (16-bit files
    read with ``IMREAD_UNCHANGED`` or ``IMREAD_ANYDEPTH``; divided by 257); float in [0, 1] (times
    255) or, when its maximum is above 1, in [0, 255] (e.g. ``cv2.imread(p).astype(np.float32)``).
    Float values outside [0, 255], NaN and inf fail with one line; so do None (what
    ``cv2.imread`` returns for an unreadable file), an empty array and other dtypes or shapes.
    """
    if image is None:
        raise ValueError("no image was given (got None; cv2.imread returns None for a file it "
                         "cannot read)")
    image = np.asarray(image)
    if image.size == 0:
        raise ValueError(f"no image was given (got an empty array of shape {image.shape})")
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        image = _float_to_uint8(image)
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
    """``DefaultPredictor`` for FAL classifiers: ``FALPredictor(cfg)(cv2.imread(path))``.

    Its input is BGR, (H, W, 3) uint8, as ``cv2.imread`` returns it and as ``DefaultPredictor``
    takes it; both convert to ``INPUT.FORMAT`` themselves. Detectron2's predictor resizes by the
    shortest edge; a classifier is trained on exact ``INPUT.CLS.SIZE`` squares, so this one resizes
    the same way (the two agree on square images, since our configs set ``INPUT.MIN_SIZE_TEST`` to
    that size). It also accepts grayscale, BGRA, 16-bit and float images (see
    :func:`to_bgr_uint8`). Returns the model's dict: ``scores``, ``pred_class``, ``class_map``
    (per level, the branch's class map of the predicted class: the explanation), ``attention``...

    It refuses an empty ``MODEL.WEIGHTS`` (a random model still answers, with confidence) unless
    ``allow_random_weights``, and a checkpoint that does not fit the model unless
    ``MODEL.WEIGHTS_PARTIAL`` (:mod:`fal_d2.checkpoint`). ``weights_file`` is the file loaded.
    """

    def __init__(self, cfg, allow_random_weights=False):
        # DefaultPredictor.__init__ is not called: its loader accepts an empty MODEL.WEIGHTS and
        # only warns about tensors that do not fit.
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        register_from_config(cfg)  # the class names of an image-folder DATASETS.TEST[0]
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        self.weights_file = load_weights(self.model, cfg, allow_random_weights=allow_random_weights,
                                         what="FALPredictor",
                                         opt_in="pass allow_random_weights=True")
        size = cfg.INPUT.CLS.SIZE
        self.aug = T.Resize((size, size))
        self.input_format = cfg.INPUT.FORMAT
        assert self.input_format in ["RGB", "BGR"], self.input_format

    def __call__(self, original_image, output_size=None):
        """
        Args:
            original_image: (H, W, 3) uint8 BGR, e.g. ``cv2.imread(path)``, or another layout
                :func:`to_bgr_uint8` accepts (grayscale, BGRA, uint16, float).
            output_size: (height, width) of the returned maps; default: the image's. A smaller
                size bounds the memory the full-size maps of a large image would take.
        """
        with torch.no_grad():
            return self.model([self.preprocess(original_image, output_size)])[0]

    def preprocess(self, original_image, output_size=None) -> dict:
        """The dataset dict the model takes for ``original_image``, as the test mapper makes it:
        "image" (3, S, S) float32 in ``INPUT.FORMAT`` order, S = ``INPUT.CLS.SIZE``, and the
        "height" and "width" of the outputs (``output_size``, default: the image's)."""
        image = to_bgr_uint8(original_image)
        height, width = output_size or image.shape[:2]
        # Resize, then reorder the channels: a full-size flipped view would be copied.
        image = self.aug.get_transform(image).apply_image(image)
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": height, "width": width}
