"""The compressed variants the studies compare, behind one `compress` and one `apply_compressed`.

    float32        the model as trained
    pruned         masks applied (global L1 pruning, `prune.py`), float32
    float16        weights and computation in half precision (Hooker's float16)
    bfloat16       weights and computation in bfloat16
    dynamic_int8   int8 per-channel weights, float activations (weight-only, BatchNorm folded)
    w8a8           PTQ, 8-bit weights and activations (Schwaiger et al.; `ptq.py`)
    w4a8           PTQ, 4-bit weights and 8-bit activations (Schwaiger et al.)
    pruned_w8a8    masks applied, then w8a8 (Schwaiger et al.): pruned weights stay exactly zero,
                   as symmetric quantization maps 0 to 0 and BatchNorm folding scales it

A `Compressed` is a pytree (variables, QuantState) with the variant as static data, so populations
are vmapped over it: `jax.vmap(apply_compressed, in_axes=(None, 0, None))(model, compressed, x)`.
"""

import flax
import jax
import jax.numpy as jnp

from compax.compress.prune import apply_masks
from compax.compress.ptq import QuantConfig, QuantState, ptq, quantized_apply
from compax.compress.size import storage_bytes
from compax.errors import UserError

# variant -> (weight bits, activation bits)
BITS = {"float32": (32, 32), "pruned": (32, 32), "float16": (16, 16), "bfloat16": (16, 16),
        "dynamic_int8": (8, 32), "w8a8": (8, 8), "w4a8": (4, 8), "pruned_w8a8": (8, 8)}
VARIANTS = tuple(BITS)
_FLOAT_TYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class Compressed:
    """What evaluating a variant needs: its variables and, for quantized ones, a QuantState."""

    variables: dict
    qstate: QuantState | None
    variant: str = flax.struct.field(pytree_node=False)

    @property
    def weight_bits(self) -> int:
        return BITS[self.variant][0]

    @property
    def activation_bits(self) -> int:
        return BITS[self.variant][1]


def compress(variant: str, model, variables, calib_images=None, masks=None, *,
             reduce_range: bool = True, observer: str = "histogram") -> Compressed:
    """The `variant` of a model; quantized variants calibrate on `calib_images` (training images).

    `masks` (from `prune.py`) are required by the pruned variants and refused by the others;
    `reduce_range` and `observer` configure activation quantization (see `ptq.QuantConfig`).
    """
    if variant not in BITS:
        raise UserError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if variant.startswith("pruned") != (masks is not None):
        raise UserError(f"variant {variant} {'needs' if masks is None else 'takes no'} masks: "
                        "pass masks to the pruned variants only")
    if masks is not None:
        variables = {**variables, "params": apply_masks(variables["params"], masks)}
    weight_bits, activation_bits = BITS[variant]
    if variant in _FLOAT_TYPES:
        return Compressed(jax.tree.map(lambda a: a.astype(_FLOAT_TYPES[variant]), variables),
                          None, variant)
    if weight_bits == 32:
        return Compressed(variables, None, variant)
    if calib_images is None:
        raise UserError(f"variant {variant} quantizes: pass calib_images (training images)")
    config = QuantConfig(weight_bits=weight_bits,
                         activation_bits=None if activation_bits == 32 else activation_bits,
                         reduce_range=reduce_range, observer=observer)
    return Compressed(*ptq(model, variables, jnp.asarray(calib_images, jnp.float32), config),
                      variant)


def apply_compressed(model, compressed: Compressed, x):
    """float32 logits of the compressed model on images `x`."""
    if compressed.qstate is not None:
        return quantized_apply(model, compressed.variables, compressed.qstate, x)
    dtype = _FLOAT_TYPES.get(compressed.variant, jnp.float32)
    return model.apply(compressed.variables, x.astype(dtype), train=False).astype(jnp.float32)


def size_bytes(compressed: Compressed) -> int:
    """Bytes of the variant as stored (see `size.py`)."""
    qstate = compressed.qstate
    return storage_bytes(
        compressed.variables, weight_bits=compressed.weight_bits,
        float_bits=16 if compressed.variant in _FLOAT_TYPES else 32,
        folds=qstate.folds if qstate else (),
        activation_points=qstate.activation_scale.shape[0] if qstate else 0)


def compression_ratio(compressed: Compressed, variables) -> float:
    """Bytes of the dense float32 `variables` over bytes of the compressed variant."""
    return storage_bytes(variables) / size_bytes(compressed)
