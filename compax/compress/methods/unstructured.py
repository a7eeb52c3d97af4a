"""Magnitude pruning as recipe steps: `l1_global` and `l1_layer`, the criterion |w|.

    l1_global(amount, exclude)   the `amount` of all conv and dense weights with the smallest |w|,
                                 ranked together: torch.nn.utils.prune.global_unstructured with
                                 L1Unstructured (Schwaiger et al. 2022; `prune.global_l1_masks`)
    l1_layer(amount, exclude)    round(amount * n) entries of smallest |w| in every kernel of n
                                 entries: torch.nn.utils.prune.l1_unstructured per layer
                                 (Han et al. 2015, "Learning both Weights and Connections")

Their masks are those of `prune.global_l1_masks` and `prune.layer_l1_masks`, bit for bit. `amount`
is a fraction in [0, 1) or `searched` (the level searched for this criterion and scope); `exclude`
a regular expression of kernel paths kept dense (default: `compress.prune_exclude`). See
`compax.compress.criterion` for what every pruning step shares.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from compax.compress.criterion import PruningStep
from compax.compress.registry import register_step


def magnitude_scores(params):
    """|w| of every leaf (the selection reads the kernels')."""
    return jax.tree.map(jnp.abs, params)


@register_step
@dataclasses.dataclass(frozen=True)
class GlobalL1(PruningStep):
    """Global L1 unstructured pruning (torch's global_unstructured, L1Unstructured)."""

    name: ClassVar[str] = "l1_global"
    scope: ClassVar[str] = "global"

    def scores(self, params, **_):
        return magnitude_scores(params)


@register_step
@dataclasses.dataclass(frozen=True)
class LayerL1(PruningStep):
    """Per-layer L1 unstructured pruning (torch's l1_unstructured on every layer)."""

    name: ClassVar[str] = "l1_layer"
    scope: ClassVar[str] = "layer"

    def scores(self, params, **_):
        return magnitude_scores(params)
