"""Seeding the global RNGs (Python's ``random``, NumPy's, torch's) from a tuple of integers.

Detectron2's augmentations draw from NumPy's global RNG, dropout from torch's. Seeding them from
(run seed, sample position) or (run seed, rank, iteration) makes every draw a pure function of
where the run is, so a resumed run draws what an uninterrupted one would, whichever worker maps a
sample and whatever ran between two steps (evaluation, PreciseBN).
"""
import random
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["derived_seed", "global_rngs_seeded", "seed_global_rngs"]


def derived_seed(*entropy: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (NumPy's SeedSequence): neighbouring
    positions get unrelated streams."""
    low, high = np.random.SeedSequence([int(value) for value in entropy]).generate_state(2)
    return (int(high) << 32 | int(low)) & ((1 << 63) - 1)


def _seed_cpu_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)


def seed_global_rngs(*entropy: int) -> None:
    """Seed Python's, NumPy's and torch's RNGs (CPU and every CUDA device) from ``entropy``."""
    seed = derived_seed(*entropy)
    _seed_cpu_rngs(seed)
    torch.cuda.manual_seed_all(seed)  # lazy: applied when CUDA initialises, a no-op without it


@contextmanager
def global_rngs_seeded(*entropy: int):
    """Run a block with Python's, NumPy's and torch's CPU RNGs seeded from ``entropy``, then put
    them back as they were: mapping a sample in the main process (no loader workers) must not move
    the trainer's RNGs. CUDA RNGs are left alone (data mapping runs on the CPU)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    _seed_cpu_rngs(derived_seed(*entropy))
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
