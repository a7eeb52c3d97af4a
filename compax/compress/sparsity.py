"""How much of a model pruning removed, per layer and overall.

Two global figures, because studies report either: the pruned share of the conv and dense weights
(what the pruning amount controls) and the pruned share of all parameters, biases and BatchNorm
included. Schwaiger et al. (2022) report the latter: amount 0.55 on LeNet-5 with 43 classes prunes
round(0.55 * 64,542) = 35,498 weights, 35,498 / 64,811 parameters = 54.77% (their Table 1: 54.8%).
"""

import jax
import numpy as np

from compax.compress.paths import is_weight, path_str


def sparsity_report(params, masks) -> dict:
    """Pruned counts and fractions of one model's `params` under `masks` (as from `prune.py`).

    Returns {'layers': {path: pruned fraction of that kernel}, 'pruned', 'weights' (all conv and
    dense kernel entries), 'params' (all parameters), 'fraction_of_weights', 'fraction_of_params'}.
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    mask_leaves = jax.tree.leaves(masks, is_leaf=lambda m: m is None)
    layers, pruned, weights, total = {}, 0, 0, 0
    for (path, leaf), mask in zip(leaves, mask_leaves, strict=True):
        total += leaf.size
        if not is_weight(path, leaf):
            continue
        removed = 0 if mask is None else int(leaf.size - np.count_nonzero(np.asarray(mask)))
        layers[path_str(path)] = removed / leaf.size
        pruned += removed
        weights += leaf.size
    return {"layers": layers, "pruned": pruned, "weights": weights, "params": total,
            "fraction_of_weights": pruned / weights, "fraction_of_params": pruned / total}
