"""fal_d2: FPN-ABN Layered networks (FAL) for Detectron2.

Importing the package registers its backbones, heads and meta-architectures in Detectron2's
registries and the UC Merced datasets in DatasetCatalog.
"""
from . import data, modeling  # noqa: F401  (registers datasets and model parts)
from .config import add_fal_config
from .explainer import Explainer, ImageExplanation
from .version import __version__

__all__ = ["Explainer", "ImageExplanation", "__version__", "add_fal_config"]
