"""Pruning at many sparsity levels at once, and picking the largest level that keeps accuracy.

Schwaiger et al. (2022) prune "as much as possible" while the accuracy stays comparable to the
uncompressed model's; Hooker et al. use the fixed levels 0.3, 0.5, 0.7, 0.9. The pruning counts of
the levels are computed on the host exactly as PyTorch does (round(level * n), float64), and the
masks for all levels come from one `vmap` of `global_l1_masks` over those counts.
"""

import jax
import jax.numpy as jnp
import numpy as np

from compax.compress.paths import weight_leaves
from compax.compress.prune import apply_masks, global_l1_masks, num_to_prune
from compax.errors import UserError

FIXED_LEVELS = (0.3, 0.5, 0.7, 0.9)


def level_counts(params, levels, *, exclude: str | None = None) -> jax.Array:
    """int32 number of weights pruned at each level: round(level * prunable weights), as torch."""
    total = sum(int(w.size) for _, w in weight_leaves(params, exclude))
    return jnp.asarray([num_to_prune(float(level), total) for level in levels], jnp.int32)


def level_masks(params, levels=FIXED_LEVELS, *, exclude: str | None = None):
    """Global L1 masks at every level, stacked on a leading level axis."""
    counts = level_counts(params, levels, exclude=exclude)
    return jax.vmap(lambda k: global_l1_masks(params, k, exclude=exclude))(counts)


def sparsity_sweep(params, levels, eval_fn, *, exclude: str | None = None,
                   batch_size: int | None = None) -> jax.Array:
    """eval_fn(pruned params) -> accuracy at every level, `batch_size` levels per vmap (default all).

    `eval_fn` must be a JAX function of the params (it is vmapped over levels), e.g.
    `lambda p: accuracy(model.apply({'params': p}, images), labels)`.
    """
    counts = level_counts(params, levels, exclude=exclude)

    def evaluate(k):
        return eval_fn(apply_masks(params, global_l1_masks(params, k, exclude=exclude)))

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
