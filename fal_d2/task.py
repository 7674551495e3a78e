"""Which task a config's model does, read from its registered class rather than from its name, so
that a user's subclass of FALClassifier (or of a detector) gets its parent's mapper, evaluators
and checks."""
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from fal_d2.modeling import FALClassifier

__all__ = ["meta_arch_class", "is_classifier", "is_retinanet"]


def meta_arch_class(cfg) -> type:
    """The class registered as ``MODEL.META_ARCHITECTURE``; fails with one line naming the key."""
    name = cfg.MODEL.META_ARCHITECTURE
    try:
        return META_ARCH_REGISTRY.get(name)
    except KeyError:
        registered = sorted(key for key, _ in META_ARCH_REGISTRY)
        raise ValueError(f"MODEL.META_ARCHITECTURE={name!r} is not registered in "
                         f"META_ARCH_REGISTRY; registered: {registered}") from None


def is_classifier(cfg) -> bool:
    """Whether the model is a FALClassifier (or a subclass): an image classifier."""
    return issubclass(meta_arch_class(cfg), FALClassifier)


def is_retinanet(cfg) -> bool:
    """Whether the model is Detectron2's RetinaNet (or a subclass, FALRetinaNet)."""
    return issubclass(meta_arch_class(cfg), RetinaNet)
