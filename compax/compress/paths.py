"""Which leaves of a parameter pytree are the weights that compression acts on.

A weight is a leaf named `kernel` with at least two dimensions: the kernel of an `nn.Conv`
(kh, kw, in, out) or of an `nn.Dense` (in, out). Biases, BatchNorm scales and everything else are
not weights. The output-channel axis of every weight is its last axis. A leaf is named by its
'/'-joined path inside the `params` collection, e.g. `layer1_0/conv1/kernel`; the order of weights is
the pytree's flattening order (sorted module names), which every function here uses.
"""

import re

import jax

from compax.errors import UserError


def path_str(path) -> str:
    """The '/'-joined name of a pytree key path: `(DictKey('conv1'), DictKey('kernel'))` -> `conv1/kernel`."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def is_weight(path, leaf) -> bool:
    """True for conv and dense kernels: a leaf named `kernel` with ndim >= 2."""
    return bool(path) and path_str(path[-1:]) == "kernel" and getattr(leaf, "ndim", 0) >= 2


def compile_exclude(exclude: str | None) -> re.Pattern | None:
    """The compiled exclusion pattern (searched in each weight's path), or None for no exclusion."""
    if exclude is None:
        return None
    try:
        return re.compile(exclude)
    except re.error as err:
        raise UserError(f"bad exclude pattern {exclude!r} ({err}): pass a Python regular expression "
                        "such as '^conv1/'") from None


def weight_leaves(params, exclude: str | None = None) -> list[tuple[str, object]]:
    """(path, kernel) of the weights in flattening order, without those whose path matches `exclude`."""
    pattern = compile_exclude(exclude)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [(path_str(p), leaf) for p, leaf in leaves
            if is_weight(p, leaf) and not (pattern and pattern.search(path_str(p)))]
