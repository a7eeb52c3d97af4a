"""SNIP, recipe step `snip`: connection sensitivity |∂L/∂c ⊙ c| at c = 1, normalised.

Lee et al. (2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity") gate every
weight by c (w ⊙ c) and score s = |∂L/∂c| at c = 1, which is |w · ∂L/∂w|, divided by its sum over
all kernels, on one mini-batch (here the first `batch` calibration images; L the mean
cross-entropy in evaluation mode). SNIP is defined at initialisation, before training; this step
scores the weights it is given, so after training it computes the same ranking as
`grad_magnitude` on the same batch: the normalisation divides every score by one positive number,
which changes no order (masks can differ only where float rounding makes two scores equal).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from compax.compress.criterion import PruningStep
from compax.compress.methods.gradient_prune import taylor_scores
from compax.compress.paths import is_weight
from compax.compress.registry import register_step


def connection_sensitivity(params, grads):
    """|w · g| / sum over all conv and dense kernels of |w · g| (unscaled where that sum is 0)."""
    scores = taylor_scores(params, grads)
    total = sum(jnp.sum(s) for p, s in jax.tree_util.tree_leaves_with_path(scores)
                if is_weight(p, s))
    return jax.tree.map(lambda s: jnp.where(total > 0, s / total, s), scores)


@register_step
@dataclasses.dataclass(frozen=True)
class Snip(PruningStep):
    """SNIP's normalised connection sensitivity on one calibration batch (module doc)."""

    name: ClassVar[str] = "snip"
    needs: ClassVar[frozenset] = frozenset({"grads"})
    scope: str = "global"
    batch: int = 128

    def scores(self, params, *, grads, **_):
        return connection_sensitivity(params, grads)
