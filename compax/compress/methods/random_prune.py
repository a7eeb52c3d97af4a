"""Random pruning, recipe step `random`: scores drawn uniformly, a different draw per member.

The score of every kernel entry is u ~ U[0, 1) from the member's key (fold_in(key(run seed),
member index), then the kernel's index in pytree order), so the pruned entries are a uniformly
random subset of exactly round(amount * n) (per `scope`: of all kernels, of each layer, or whole
filters), as jaxpruner's random pruning and the random baseline of Blalock et al. (2020, "What is
the State of Neural Network Pruning?"). The same run seed gives the same masks; members differ.
"""

import dataclasses
from typing import ClassVar

import jax

from compax.compress.criterion import PruningStep
from compax.compress.registry import register_step


@register_step
@dataclasses.dataclass(frozen=True)
class RandomPruning(PruningStep):
    """Uniformly random unstructured (or filter) pruning (module doc)."""

    name: ClassVar[str] = "random"
    needs: ClassVar[frozenset] = frozenset({"key"})
    scope: str = "global"

    def scores(self, params, *, key, **_):
        leaves, treedef = jax.tree.flatten(params)
        return treedef.unflatten([jax.random.uniform(jax.random.fold_in(key, i), leaf.shape)
                                  for i, leaf in enumerate(leaves)])
