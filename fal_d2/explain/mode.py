"""Run a model for explanations without changing it: eval mode, frozen parameters, then restore."""
import contextlib

from torch import nn

__all__ = ["explanation_mode"]


@contextlib.contextmanager
def explanation_mode(model: nn.Module):
    """
    Put every module in eval mode (BatchNorm uses its running statistics, so images of a batch do
    not interact) and freeze every parameter (no parameter ``.grad`` is ever touched), then restore
    each module's ``training`` flag and each parameter's ``requires_grad``, also on an exception.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in requires_grad:
            param.requires_grad_(False)
        yield model
    finally:
        for module, mode in training:
            module.training = mode
        for param, flag in requires_grad:
            param.requires_grad_(flag)
