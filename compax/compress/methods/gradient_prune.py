"""Gradient-magnitude pruning, recipe step `grad_magnitude`: scores |w · ∂L/∂w|.

The first-order Taylor estimate of the change of the loss when a weight is set to zero,
|L(w) - L(w with w_i = 0)| ≈ |w_i · ∂L/∂w_i| (Molchanov et al. 2017, "Pruning Convolutional Neural
Networks for Resource Efficient Inference", applied to single weights rather than feature maps),
with L the mean cross-entropy of the member on the first `batch` calibration images (training
images, `compress.calibration_images`), in evaluation mode. Selection per `scope` (`criterion.py`).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from compax.compress.criterion import PruningStep
from compax.compress.registry import register_step


def taylor_scores(params, grads):
    """|w · g| entry by entry."""
    return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


@register_step
@dataclasses.dataclass(frozen=True)
class GradientMagnitude(PruningStep):
    """First-order Taylor pruning, |w · ∂L/∂w| on a calibration batch (module doc)."""

    name: ClassVar[str] = "grad_magnitude"
    needs: ClassVar[frozenset] = frozenset({"grads"})
    scope: str = "global"
    batch: int = 128

    def scores(self, params, *, grads, **_):
        return taylor_scores(params, grads)
