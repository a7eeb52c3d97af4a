"""Scores to masks: the selection shared by every pruning criterion.

A criterion scores each entry of each conv and dense kernel (a pytree shaped like the params, a
non-negative float per kernel entry; other leaves are ignored); the selection prunes the entries of
lowest score. `scope` says what is ranked together:

    global        all entries of all kernels together: round(amount * n) pruned, n all entries
    layer         each kernel alone: round(amount * n_l) of its n_l entries
    filter        each kernel's output channels (last axis), scored by the sum of their entries'
                  scores, round(amount * C_l) of its C_l channels pruned whole
    global_filter all channels together, scored by the mean of their entries' scores (so that
                  layers of different fan-in compare): round(amount * all channels) pruned whole

Counts: a float amount is a fraction, round half to even in float64 like PyTorch's
`_compute_nparams_toprune`; an int is a count (`prune.num_to_prune`). A traced amount (a level
inside `vmap`) is rounded in float32, so sweeps pass exact counts from `level_counts` instead.
Ties: among equal scores the entry (or channel) of lower index is pruned first, the index running
over the kernels in pytree order, each flattened row-major (`prune.lowest_k`). Kernels whose path
matches the regular expression `exclude` are neither counted nor pruned. Masks: True = kept, None
for every leaf that is not a pruned kernel (`prune.kernel_masks`).

With |w| as scores, `global` and `layer` are torch's `global_unstructured` and `l1_unstructured`
with L1Unstructured, and `filter` is `ln_structured(n=1, dim=0)` on every layer (`prune.py`,
`structured.py`).
"""

import jax.numpy as jnp
import numpy as np

from compax.compress.paths import weight_leaves
from compax.compress.prune import kernel_masks, lowest_k, num_to_prune
from compax.errors import UserError

SCOPES = ("global", "layer", "filter", "global_filter")


def check_scope(scope: str, where: str) -> None:
    """Raises a UserError naming `where` unless `scope` is one of `SCOPES`."""
    if scope not in SCOPES:
        raise UserError(f"{where}: scope must be one of {', '.join(SCOPES)}, got {scope!r}")


def _channel_scores(score, scope: str):
    """Per output channel: the sum (`filter`) or mean (`global_filter`) of the entries' scores."""
    summed = jnp.sum(score.astype(jnp.float32), axis=tuple(range(score.ndim - 1)))
    return summed if scope == "filter" else summed / (score.size // score.shape[-1])


def _units(shape, scope: str) -> int:
    """How many selectable units a kernel of `shape` has: entries, or output channels."""
    return int(np.prod(shape)) if scope in ("global", "layer") else int(shape[-1])


def select_counts(scores, counts, *, scope: str = "global", exclude: str | None = None):
    """Masks pruning `counts` units of lowest score: a scalar count for the global scopes, one count
    per kernel (an int array in pytree order of the kept kernels) for `layer` and `filter`. Counts
    may be traced (a sweep vmaps over them). Pure, jit- and vmap-compatible."""
    def select(kernels):
        if scope == "global":
            return lowest_k(kernels, counts)
        if scope == "layer":
            return [lowest_k([s], counts[i])[0] for i, s in enumerate(kernels)]
        channels = [_channel_scores(s, scope) for s in kernels]
        if scope == "global_filter":
            return lowest_k(channels, counts)
        return [lowest_k([c], counts[i])[0] for i, c in enumerate(channels)]

    check_scope(scope, "selection")
    return kernel_masks(scores, select, exclude)


def level_counts(scores, levels, *, scope: str = "global", exclude: str | None = None):
    """int32 counts pruned at each level (a fraction, or an int count): shape (levels,) for the
    global scopes, (levels, kernels) for `layer` and `filter`; computed on the host, exactly."""
    check_scope(scope, "selection")
    units = [_units(w.shape, scope) for _, w in weight_leaves(scores, exclude)]
    if scope.startswith("global"):
        return jnp.asarray([num_to_prune(level, sum(units)) for level in levels], jnp.int32)
    return jnp.asarray([[num_to_prune(level, n) for n in units] for level in levels], jnp.int32)


def select_masks(scores, amount, *, scope: str = "global", exclude: str | None = None):
    """Masks pruning the `amount` (fraction or count, see the module doc) of lowest `scores`;
    pass Python numbers for PyTorch's exact count (a traced amount is rounded in float32)."""
    check_scope(scope, "selection")
    if scope.startswith("global"):
        total = sum(_units(w.shape, scope) for _, w in weight_leaves(scores, exclude))
        return select_counts(scores, num_to_prune(amount, total), scope=scope, exclude=exclude)
    counts = level_counts(scores, [amount], scope=scope, exclude=exclude)[0]
    return select_counts(scores, counts, scope=scope, exclude=exclude)
