"""Global unstructured magnitude pruning, as `torch.nn.utils.prune.global_unstructured` with L1 scores.

`global_unstructured(params, pruning_method=prune.L1Unstructured, amount=p)` concatenates the listed
weights, takes `k = _compute_nparams_toprune(p, n)` (an int `p` is a count, a float `p` gives
`round(p * n)`, Python's round: half to even) and prunes the k entries of smallest |w| found by
`torch.topk(|w|, k, largest=False)`. Pruning is "as much as possible while keeping comparable accuracy"
in Schwaiger et al. (2022), no fine-tuning.

Ties: `torch.topk` leaves the order of equal scores to the implementation. Here the rule is stable and
documented: among equal |w| the entry with the lower index in the concatenation (weights in pytree
order, each flattened row-major) is pruned first. Without ties the masks equal PyTorch's.

The k-th smallest score is found without sorting: the bit pattern of a non-negative float32 orders
like its value, so a radix select over the patterns (two counting passes) gives the threshold; the
count k may be a traced integer, so pruning at many sparsity levels is one `vmap`.

Masks are pytrees of the params' structure: a boolean array (True = kept, as PyTorch's mask of ones)
for each pruned weight and None for every other leaf (biases, BatchNorm, excluded layers).

The helpers here are what every pruning criterion shares: `num_to_prune` (the exact count),
`lowest_k` (the k lowest scores, ties by index) and `kernel_masks` (which kernels are pruned, and
the mask pytree). `selection.py` builds the global, per-layer and per-filter selection of any
criterion's scores on them, and `criterion.py` says how a criterion is written.
"""

import jax
import jax.numpy as jnp
import numpy as np

from compax.compress.paths import compile_exclude, is_weight, path_str
from compax.errors import UserError


def num_to_prune(amount, total: int):
    """Number of entries to prune, as torch's `_compute_nparams_toprune`.

    An integer `amount` (Python, NumPy, or an integer jax array) is a count; a float one is a
    fraction and gives `round(amount * total)`, half to even. Python and NumPy numbers are checked
    and converted exactly as PyTorch does (float64); a float jax array (e.g. a traced level) is
    rounded in float32, which can differ by one from float64 when amount * total lies within float32
    precision of a half-integer, so pass Python floats or integer counts for an exact torch match.
    """
    if isinstance(amount, (bool, np.bool_)):
        raise UserError(f"pruning amount {amount!r} is a bool: pass a fraction in [0, 1] or a count")
    if isinstance(amount, (int, np.integer)):
        if not 0 <= amount <= total:
            raise UserError(f"pruning count {amount} is outside [0, {total}]: pass a count of at "
                            "most the number of prunable weights")
        return int(amount)
    if isinstance(amount, (float, np.floating)):
        if not 0.0 <= amount <= 1.0:
            raise UserError(f"pruning amount {amount} is outside [0, 1]: pass a fraction such as 0.5")
        return round(float(amount) * total)
    amount = jnp.asarray(amount)
    if jnp.issubdtype(amount.dtype, jnp.integer):
        return amount.astype(jnp.int32)
    return jnp.round(amount.astype(jnp.float32) * total).astype(jnp.int32)


def _kth_smallest(bits: list, k):
    """The k-th smallest value of the int32 patterns `bits` (all >= 0), by a two-digit radix select.

    The high 16 bits are counted in 65,536 buckets, the bucket holding the k-th entry is found from
    the running counts, and its entries' low 15 bits are counted the same way.
    """
    high = sum(jnp.bincount((b >> 15).ravel(), length=1 << 16) for b in bits)
    running = jnp.cumsum(high)
    bucket = jnp.minimum(jnp.searchsorted(running, k), (1 << 16) - 1)
    before = jnp.where(bucket > 0, running[bucket - 1], 0)
    low = sum(jnp.bincount(jnp.where((b >> 15) == bucket, b & 0x7FFF, 1 << 15).ravel(),
                           length=(1 << 15) + 1)[:-1] for b in bits)
    digit = jnp.minimum(jnp.searchsorted(jnp.cumsum(low), k - before), (1 << 15) - 1)
    return (bucket << 15) | digit


@jax.jit
def lowest_k(scores: list, k) -> list:
    """Boolean masks marking the k smallest entries over all `scores` (True = among the k smallest).

    Scores must be non-negative (their float32 bit patterns then order like their values); equal
    scores are taken in order of their index in the concatenation of the flattened `scores`. `k`
    may be traced; k <= 0 marks nothing and k >= the total marks everything.
    """
    bits = [jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32) for s in scores]
    threshold = _kth_smallest(bits, k)
    ties_to_take = k - sum(jnp.sum(b < threshold, dtype=jnp.int32) for b in bits)
    ties = sum(jnp.sum(b == threshold, dtype=jnp.int32) for b in bits)

    def all_ties():
        return [b <= threshold for b in bits]

    def first_ties():
        marks, ties_before = [], jnp.int32(0)
        for b in bits:
            tie = b == threshold
            rank = ties_before + jnp.cumsum(tie.ravel(), dtype=jnp.int32).reshape(b.shape)
            marks.append((b < threshold) | (tie & (rank <= ties_to_take)))
            ties_before = ties_before + jnp.sum(tie, dtype=jnp.int32)
        return marks

    return jax.lax.cond(ties_to_take >= ties, all_ties, first_ties)


def kernel_masks(params, select, exclude: str | None = None):
    """Masks for the conv and dense kernels not matching `exclude`, pruned as `select` says.

    `select(kernels) -> flags` gets the chosen kernels in pytree order and returns, per kernel, a
    boolean array broadcastable to its shape that is True where an entry is pruned.
    """
    pattern = compile_exclude(exclude)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    chosen = [is_weight(p, leaf) and not (pattern and pattern.search(path_str(p)))
              for p, leaf in leaves]
    kernels = [leaf for (_, leaf), c in zip(leaves, chosen, strict=True) if c]
    if not kernels:
        raise UserError("no conv or dense kernels to prune: check the params pytree and the "
                        f"exclude pattern {exclude!r}")
    pruned = iter(select(kernels))
    return treedef.unflatten([jnp.broadcast_to(~next(pruned), leaf.shape) if c else None
                              for (_, leaf), c in zip(leaves, chosen, strict=True)])


def global_l1_masks(params, amount, *, exclude: str | None = None):
    """Masks that prune the `amount` of all conv and dense kernels with the smallest |w|, globally.

    Equals `torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured,
    amount=amount)` over the same weights (see the module doc for ties). `amount` is a fraction or a
    count (see `num_to_prune`) and may be traced; weights whose path matches the regular expression
    `exclude` (e.g. '^conv1/') are neither scored nor pruned. Pure, jit- and vmap-compatible; under
    `jax.jit` keep a float amount static (static_argnames='amount') for PyTorch's exact count.
    """
    def select(kernels):
        k = num_to_prune(amount, sum(int(w.size) for w in kernels))
        return lowest_k([jnp.abs(w) for w in kernels], k)
    return kernel_masks(params, select, exclude)


def apply_masks(params, masks):
    """Params with every masked-out entry set to zero (leaves whose mask is None are unchanged)."""
    return jax.tree.map(lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros_like(p)),
                        masks, params, is_leaf=lambda m: m is None)


def layer_l1_masks(params, amount, *, exclude: str | None = None):
    """Masks that prune, in every conv and dense kernel of n entries, the round(amount * n) of
    smallest |w|: `torch.nn.utils.prune.l1_unstructured(module, 'weight', amount)` on each layer.

    Ties as `global_l1_masks` (lowest index first); `amount` a Python float for torch's exact count.
    """
    def select(kernels):
        return [lowest_k([jnp.abs(w)], num_to_prune(amount, int(w.size)))[0] for w in kernels]
    return kernel_masks(params, select, exclude)
