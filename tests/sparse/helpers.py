"""Small shared helpers for the sparse tests."""

from __future__ import annotations

import numpy as np

from shrinkjax.models.llama import abstract_model
from shrinkjax.models.params import flat_params, model_from_params


def random_model(cfg, seed=0):
    """A model with N(0, 0.1) weights and unit norms, built without flax's (slow) eager init."""
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in flat_params(abstract_model(cfg)).items()}
    flat = {
        k: np.ones(sh, np.float32)
        if len(sh) == 1
        else (0.1 * rng.standard_normal(sh)).astype(np.float32)
        for k, sh in shapes.items()
    }
    return model_from_params(cfg, flat)
