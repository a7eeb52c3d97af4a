"""Bytes of a model as stored, for each compression, and compression ratios against float32.

Per conv / dense kernel with n entries, nnz of them non-zero, `bits` per stored value and C output
channels, the smallest of three encodings (a pruned kernel is stored sparse only where that pays):

    dense     ceil(n * bits / 8)                                   (int4: two values per byte)
    bitmask   ceil(n / 8) + ceil(nnz * bits / 8)                   (one presence bit per entry)
    CSR       ceil(nnz * bits / 8) + 4 nnz + 4 (C + 1)             (int32 column indices and row
                                                                    pointers, rows = channels)

plus, for integer kernels (bits <= 8), a float32 scale and an int32 zero point (8 bytes) per
output channel, 8 C, for per-channel quantization, or one pair, 8, for per-tensor quantization
(`Compressed.granularity`).
Every other parameter is stored as a float (`float_bits`), biases included. A BatchNorm folded into
its layer keeps only its folded bias (float32), and the layer's own bias and the BatchNorm's scale
and running statistics disappear; activation quantization adds a float32 scale and an int32 zero
point per quantization point.
"""

import math

import jax
import numpy as np
from flax import traverse_util

from compax.compress.paths import is_weight, path_str

QPARAM_BYTES = 8  # float32 scale + int32 zero point


def kernel_bytes(kernel, bits: int) -> int:
    """Bytes of one kernel in the smallest of the dense, bitmask and CSR encodings (no qparams)."""
    n, channels = int(np.size(kernel)), int(np.shape(kernel)[-1])
    nnz = int(np.count_nonzero(np.asarray(kernel)))
    values = math.ceil(nnz * bits / 8)
    return min(math.ceil(n * bits / 8), math.ceil(n / 8) + values,
               values + 4 * nnz + 4 * (channels + 1))


def storage_bytes(variables, *, weight_bits: int = 32, float_bits: int = 32, folds=(),
                  activation_points: int = 0, quantized_kernels=None,
                  granularity: str = "per_channel") -> int:
    """Bytes to store `variables` with kernels at `weight_bits` and other floats at `float_bits`.

    `folds` are the `fold.BatchNormFold`s of a BatchNorm-folded model (as in `QuantState.folds`);
    `quantized_kernels`: the paths of the kernels stored at `weight_bits` when not all are (the
    others are floats); `granularity`: "per_channel" or "per_tensor", how many scales and zero
    points each integer kernel stores (module doc).
    """
    folded_bn = {f.bn for f in folds}
    dropped = ({f"{f.layer}/bias" for f in folds} | {f"{f.bn}/scale" for f in folds})
    total = activation_points * QPARAM_BYTES
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get("params", {})):
        name = path_str(path)
        if is_weight(path, leaf) and quantized_kernels is not None and name not in quantized_kernels:
            total += kernel_bytes(leaf, float_bits)
        elif is_weight(path, leaf):
            total += kernel_bytes(leaf, weight_bits)
            if weight_bits <= 8:
                total += QPARAM_BYTES * (1 if granularity == "per_tensor" else leaf.shape[-1])
        elif name.rsplit("/", 1)[0] in folded_bn:
            total += 0 if name in dropped else leaf.size * 4
        elif name not in dropped:
            total += leaf.size * float_bits // 8
    stats = traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
    total += sum(v.size * float_bits // 8 for k, v in stats.items()
                 if k.rsplit("/", 1)[0] not in folded_bn)
    return total
