"""An exponential moving average (EMA) of the weights, as a Detectron2 hook.

From scratch on 1680 images, the weights of the last iterations are noisy estimates of a good
model; their running average usually evaluates better, at no training cost beyond one in-place
blend per step. The hook keeps the average in a copy of the model (``ema_model``), which the
trainer evaluates instead of the trained weights. Being a hook with ``state_dict``, the average
travels in every checkpoint (Detectron2 saves hook states in the trainer state), so ``--resume``
continues it. After the last step it is copied into the model, so that ``model_final.pth``,
and everything that loads it (``--eval-only``, the predictors, export), holds the averaged weights.
"""
import copy

import torch

from detectron2.engine import HookBase

__all__ = ["WeightEMA", "check_ema_config"]


def check_ema_config(cfg) -> None:
    """One-line error, naming the key, for a decay outside (0, 1)."""
    decay = cfg.MODEL.EMA.DECAY
    if cfg.MODEL.EMA.ENABLED and not 0 < decay < 1:
        raise ValueError(f"MODEL.EMA.DECAY={decay}: must be in (0, 1)")


def _bare(model):
    return getattr(model, "module", model)  # unwrap DistributedDataParallel


class WeightEMA(HookBase):
    """After every step: ema = d * ema + (1 - d) * weights, with d = min(decay, (1 + t) / (10 + t)).

    The ramp (as in TensorFlow's ExponentialMovingAverage with ``num_updates``) keeps the first
    iterations, whose weights are far from the final ones, from dominating a short run's average.
    BatchNorm statistics are averaged like the weights; integer buffers are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = _bare(model)
        self.decay = decay
        self.ema_model = copy.deepcopy(self.model).eval()
        self.ema_model.requires_grad_(False)
        self.updates = 0

    def before_train(self):
        """Start the average from the weights training starts from: MODEL.WEIGHTS are loaded
        after the hooks are built. A resumed average (``updates`` > 0) is kept. So a frozen
        weight (the explanation head's second stage) stays exactly what it was."""
        if self.updates == 0:
            self.ema_model.load_state_dict(self.model.state_dict())

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = self.model.state_dict()
        for name, average in self.ema_model.state_dict().items():
            value = current[name].detach()
            if average.dtype.is_floating_point:
                average.lerp_(value.to(average.dtype), 1.0 - decay)
            else:
                average.copy_(value)

    def after_step(self):
        self.update()
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            # The last step: Detectron2's checkpointer writes model_final in its after_step, next.
            self.model.load_state_dict(self.ema_model.state_dict())

    def state_dict(self):
        return {"ema_model": self.ema_model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state_dict):
        self.ema_model.load_state_dict(state_dict["ema_model"])
        self.updates = state_dict["updates"]
