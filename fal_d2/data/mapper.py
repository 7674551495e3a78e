"""Turn a classification dataset dict into a model input: read, resize, augment, to tensor."""
import copy
import logging

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.data.detection_utils import check_image_size, read_image

from .random_resized_crop import RandomResizedCrop, check_crop_config

__all__ = ["ClassificationDatasetMapper", "RandomRotate90", "Rot90Transform"]

_CHANNEL_ORDERS = ("RGB", "BGR")


class Rot90Transform(T.Transform):
    """Counter-clockwise rotation by ``k`` quarter turns: exact, unlike an interpolated rotation."""

    def __init__(self, h, w, k):
        """
        Args:
            h, w (int): size of the input image.
            k (int): number of counter-clockwise quarter turns, 0 to 3.
        """
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        return np.rot90(img, self.k, axes=(0, 1))

    def apply_coords(self, coords):
        # Continuous (x, y) coordinates with the image spanning [0, w] x [0, h].
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        if self.k == 1:
            coords[:, 0], coords[:, 1] = y, self.w - x
        elif self.k == 2:
            coords[:, 0], coords[:, 1] = self.w - x, self.h - y
        elif self.k == 3:
            coords[:, 0], coords[:, 1] = self.h - y, x
        return coords

    def inverse(self):
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(h, w, (4 - self.k) % 4)


class RandomRotate90(T.Augmentation):
    """Rotate by 0, 90, 180 or 270 degrees, uniformly: aerial scenes have no canonical "up"."""

    def get_transform(self, image):
        h, w = image.shape[:2]
        return Rot90Transform(h, w, np.random.randint(4))


class _RandomSaturation(T.Augmentation):
    """
    T.RandomSaturation for an image in RGB or BGR order. T.RandomSaturation computes luma with RGB
    weights; its blend target is a single grey channel, so computing it from an RGB view gives a
    transform that is correct for the image in either order.
    """

    def __init__(self, intensity_min, intensity_max, image_format):
        super().__init__()
        self._rgb_saturation = T.RandomSaturation(intensity_min, intensity_max)
        self._init(locals())

    def get_transform(self, image):
        rgb = image[..., ::-1] if self.image_format == "BGR" else image
        return self._rgb_saturation.get_transform(rgb)


class ClassificationDatasetMapper:
    """
    Map a dataset dict of :func:`fal_d2.data.load_ucmerced` to a model input. The returned dict
    is a copy of the input plus "image": a contiguous CHW uint8 tensor of size SIZE x SIZE in
    INPUT.FORMAT channel order. "height" and "width" keep the original image size, which
    Detectron2 meta-architectures use to rescale outputs.

    Every image is first resized to SIZE x SIZE (deterministic), then, in training, randomly
    cropped and resized back (INPUT.CLS.CROP_SCALE), flipped, rotated by multiples of 90 degrees
    and colour jittered as configured.

    With ``cache_images``, the resized image is kept in memory keyed by file name, so each image
    is decoded once: at most 2100 x 256 x 256 x 3 bytes (about 400 MB) for UC Merced at SIZE 256.
    The cache lives in this mapper object, so each DataLoader worker process fills its own and
    loses it when the worker exits: Detectron2's training loader keeps its workers for the whole
    run, while its inference loader starts new ones for every evaluation.
    """

    @configurable
    def __init__(self, *, size, augmentations, image_format, cache_images=False):
        """
        Args:
            size (int): images are resized to size x size.
            augmentations (list[T.Augmentation]): applied after the resize; empty at test time.
            image_format (str): "RGB" or "BGR", as read by Detectron2's read_image.
            cache_images (bool): keep resized images in memory, see the class docstring.
        """
        if image_format not in _CHANNEL_ORDERS:
            raise ValueError(f"INPUT.FORMAT={image_format!r}: use one of {_CHANNEL_ORDERS}")
        self.resize = T.Resize((size, size))
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.cache = {} if cache_images else None
        logger = logging.getLogger(__name__)
        logger.info(f"[ClassificationDatasetMapper] Augmentations after resize: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        augmentations = []
        if is_train:
            check_crop_config(cfg)
            if tuple(cfg.INPUT.CLS.CROP_SCALE) != (1.0, 1.0):
                augmentations.append(RandomResizedCrop(tuple(cfg.INPUT.CLS.CROP_SCALE),
                                                       tuple(cfg.INPUT.CLS.CROP_RATIO)))
            if cfg.INPUT.CLS.RANDOM_FLIP:
                augmentations.append(T.RandomFlip(horizontal=True, vertical=False))
                augmentations.append(T.RandomFlip(horizontal=False, vertical=True))
            if cfg.INPUT.CLS.RANDOM_ROTATE90:
                augmentations.append(RandomRotate90())
            jitter = cfg.INPUT.CLS.COLOR_JITTER
            if jitter > 0:
                augmentations.append(T.RandomBrightness(1 - jitter, 1 + jitter))
                augmentations.append(T.RandomContrast(1 - jitter, 1 + jitter))
                augmentations.append(_RandomSaturation(1 - jitter, 1 + jitter, cfg.INPUT.FORMAT))
        return {
            "size": cfg.INPUT.CLS.SIZE,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "cache_images": cfg.DATALOADER.CACHE_IMAGES,
        }

    def _read_resized(self, dataset_dict):
        """The image resized to size x size and its original (h, w)."""
        file_name = dataset_dict["file_name"]
        if self.cache is not None and file_name in self.cache:
            image, original_size = self.cache[file_name]
            return image.copy(), original_size  # augmentations may not alter the cached image
        try:
            image = read_image(file_name, format=self.image_format)
        except OSError as error:  # a truncated or corrupt file: PIL's message omits its name
            raise OSError(f"{file_name}: cannot read the image ({error})") from error
        check_image_size(dataset_dict, image)
        original_size = image.shape[:2]
        # A writable copy: PIL-backed arrays are read-only, which T.VFlip's torch path warns about.
        image = np.array(self.resize.get_transform(image).apply_image(image))
        if self.cache is not None:
            self.cache[file_name] = (image.copy(), original_size)
        return image, original_size

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image, (height, width) = self._read_resized(dataset_dict)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        # A C-ordered copy: contiguous whatever the flips and rotations left.
        chw = np.array(aug_input.image.transpose(2, 0, 1), order="C")
        dataset_dict["image"] = torch.from_numpy(chw)
        dataset_dict["height"], dataset_dict["width"] = height, width
        return dataset_dict
