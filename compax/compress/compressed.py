"""A compressed model as one pytree, how it is evaluated and how many bytes it takes.

A `Compressed` holds the variables (weights as compressed: pruned entries zero, quantized weights
on their integer grid, BatchNorm folded) and, for activation-quantized models, a `QuantState`;
its bit widths, compute dtype and weight-scale granularity are static data. Populations are
vmapped over it: `jax.vmap(apply_compressed, in_axes=(None, 0, None))(model, compressed, x)`.

The variants themselves are recipes of registered steps (`registry.py`, `RECIPES`; one
model's: `compax.one_model.compress`):

    float32        the model as trained
    pruned         global L1 pruning at the searched level (`prune.py`), float32
    float16        weights and computation in half precision
    float16_storage  weights stored in float16, computed in float32 (TFLite's float16
                   quantization on the CPU, as Hooker's thesis ran it)
    bfloat16       weights and computation in bfloat16
    weight_only_int8  int8 per-channel weights, float activations (BatchNorm folded)
    dynamic_int8   int8 per-channel weights, each layer's input quantized at run time from its own
                   range (`torch.ao.quantization.quantize_dynamic`; `methods/dynamic.py`)
    w8a8           PTQ, 8-bit weights and activations (Schwaiger et al.; `ptq.py`)
    w4a8           PTQ, 4-bit weights and 8-bit activations (Schwaiger et al.)
    pruned_w8a8    pruned, then w8a8 (Schwaiger et al.): pruned weights stay exactly zero, as
                   symmetric quantization maps 0 to 0 and BatchNorm folding scales it
"""

import flax
import jax.numpy as jnp

from compax.compress.ptq import QuantState, quantized_apply
from compax.compress.size import storage_bytes

FLOAT_TYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
# The variants of Schwaiger et al. and Hooker et al. (`registry.RECIPES`).
VARIANTS = ("float32", "pruned", "float16", "float16_storage", "bfloat16", "weight_only_int8",
            "dynamic_int8", "w8a8", "w4a8", "pruned_w8a8")


@flax.struct.dataclass
class Compressed:
    """What evaluating a variant needs: its variables and, for quantized ones, a QuantState."""

    variables: dict
    qstate: QuantState | None
    weight_bits: int = flax.struct.field(pytree_node=False, default=32)
    activation_bits: int = flax.struct.field(pytree_node=False, default=32)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")  # of weights and compute
    # Float type the weights are stored in when it is not `dtype` (they are computed in `dtype`).
    storage_dtype: str | None = flax.struct.field(pytree_node=False, default=None)
    # How many scales and zero points an integer kernel stores: "per_channel", one per output
    # channel (fbgemm's default, and every variant saved before granularity was recorded), or
    # "per_tensor", one per kernel. Set by the quantize steps; counted by `size_bytes`.
    granularity: str = flax.struct.field(pytree_node=False, default="per_channel")


def apply_compressed(model, compressed: Compressed, x):
    """float32 logits of the compressed model on images `x`."""
    if compressed.qstate is not None:
        return quantized_apply(model, compressed.variables, compressed.qstate, x)
    dtype = FLOAT_TYPES[compressed.dtype]
    return model.apply(compressed.variables, x.astype(dtype), train=False).astype(jnp.float32)


def size_bytes(compressed: Compressed) -> int:
    """Bytes of the variant as stored (see `size.py`)."""
    qstate = compressed.qstate
    return storage_bytes(
        compressed.variables, weight_bits=compressed.weight_bits,
        float_bits=jnp.finfo(FLOAT_TYPES[compressed.storage_dtype or compressed.dtype]).bits,
        folds=qstate.folds if qstate else (),
        activation_points=qstate.activation_scale.shape[0] if qstate else 0,
        quantized_kernels=set(qstate.weight_scale) if qstate else None,
        granularity=compressed.granularity)


def compression_ratio(compressed: Compressed, variables) -> float:
    """Bytes of the dense float32 `variables` over bytes of the compressed variant."""
    return storage_bytes(variables) / size_bytes(compressed)
