"""Pruning at many sparsity levels at once, and picking the largest level that keeps accuracy.

Schwaiger et al. (2022) prune "as much as possible" while the accuracy stays comparable to the
uncompressed model's; Hooker et al. use the fixed levels 0.3, 0.5, 0.7, 0.9. A sweep scores the
weights once (|w| by default, or a criterion's scores, `compax.compress.criterion`), computes the
pruning counts of the levels on the host exactly as PyTorch does (round(level * n), float64, per
the selection's scope, `selection.level_counts`) and makes the masks of all levels with one `vmap`
(or `lax.map`) of the shared selection over those counts.
"""

import jax
import jax.numpy as jnp
import numpy as np

from compax.compress.prune import apply_masks
from compax.compress.selection import level_counts, select_counts
from compax.errors import UserError

FIXED_LEVELS = (0.3, 0.5, 0.7, 0.9)


def level_masks(params, levels=FIXED_LEVELS, *, scores=None, scope: str = "global",
                exclude: str | None = None):
    """Masks at every level, stacked on a leading level axis: the lowest `scores` (default |w|,
    i.e. global L1 masks) selected per `scope`."""
    scores = jax.tree.map(jnp.abs, params) if scores is None else scores
    counts = level_counts(scores, levels, scope=scope, exclude=exclude)
    return jax.vmap(lambda k: select_counts(scores, k, scope=scope, exclude=exclude))(counts)


def sparsity_sweep(params, levels, eval_fn, *, scores=None, scope: str = "global",
                   exclude: str | None = None, batch_size: int | None = None) -> jax.Array:
    """eval_fn(pruned params) -> accuracy at every level, `batch_size` levels per vmap (default all).

    The pruned entries are the lowest `scores` (default |w|: global L1 with scope `global`)
    selected per `scope`. `eval_fn` must be a JAX function of the params (it is vmapped over
    levels), e.g. `lambda p: accuracy(model.apply({'params': p}, images), labels)`.
    """
    scores = jax.tree.map(jnp.abs, params) if scores is None else scores
    counts = level_counts(scores, levels, scope=scope, exclude=exclude)

    def evaluate(k):
        return eval_fn(apply_masks(params, select_counts(scores, k, scope=scope, exclude=exclude)))

    return jax.lax.map(evaluate, counts, batch_size=batch_size or len(counts))


def select_max_sparsity(levels, accs, baseline_acc: float, tolerance_pp: float = 1.0) -> float:
    """The largest level whose accuracy is at least baseline - tolerance_pp percentage points.

    Accuracies are fractions in [0, 1]. Returns 0.0 when no level qualifies (no pruning).
    """
    levels, accs = np.asarray(levels, float), np.asarray(accs, float)
    if levels.shape != accs.shape:
        raise UserError(f"{levels.size} levels but {accs.size} accuracies: pass one per level")
    if not (0 <= accs.min(initial=0) and accs.max(initial=0) <= 1 and 0 <= baseline_acc <= 1):
        raise UserError("accuracies must be fractions in [0, 1]; divide percentages by 100")
    ok = accs >= baseline_acc - tolerance_pp / 100 - 1e-12
    return float(levels[ok].max()) if ok.any() else 0.0
