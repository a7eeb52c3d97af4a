"""Structured pruning: whole output channels (conv filters, dense output units) by their L1 norm.

A filter's score is the L1 norm of its kernel slice, sum |w[..., c]| (Li et al., "Pruning Filters for
Efficient ConvNets", 2017). Per layer, `layer_filter_masks` prunes round(amount * C) filters of each
layer, which is `torch.nn.utils.prune.ln_structured(module, "weight", amount, n=1, dim=0)` applied
to every layer (torch keeps the C - k largest norms; here the k smallest are pruned, equal norms
lowest channel first, which is the same set without ties). `global_filter_masks` ranks the filters
of all layers together by their mean |w| (the L1 norm over the number of weights in the filter, so
that layers with different fan-in compare) and prunes round(amount * total filters). Both are the
shared selection (`selection.py`, scopes `filter` and `global_filter`) of the scores |w|.

Only kernels are masked; biases stay, as in PyTorch, so a pruned channel outputs its bias. Masks
have the convention of `prune.py` (True = kept, None for unmasked leaves); exclude the classifier
(e.g. exclude='^fc3/') unless classes may be pruned away.
"""

import jax
import jax.numpy as jnp

from compax.compress.selection import select_masks


def layer_filter_masks(params, amount, *, exclude: str | None = None):
    """Masks pruning round(amount * C) lowest-L1 output channels of every conv and dense layer."""
    return select_masks(jax.tree.map(jnp.abs, params), amount, scope="filter", exclude=exclude)


def global_filter_masks(params, amount, *, exclude: str | None = None):
    """Masks pruning round(amount * all channels) output channels of lowest mean |w|, over all layers."""
    return select_masks(jax.tree.map(jnp.abs, params), amount, scope="global_filter",
                        exclude=exclude)
