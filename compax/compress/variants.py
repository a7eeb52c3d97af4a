"""A compressed model as one pytree, how it is evaluated and stored, and `compress` for one model.

A `Compressed` holds the variables (weights as compressed: pruned entries zero, quantized weights
on their integer grid, BatchNorm folded) and, for activation-quantized models, a `QuantState`;
its bit widths and compute dtype are static data. Populations are vmapped over it:
`jax.vmap(apply_compressed, in_axes=(None, 0, None))(model, compressed, x)`.

The variants themselves are recipes of registered steps (`registry.py`, `RECIPES`):

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
import jax
import jax.numpy as jnp
import numpy as np

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


def compress(variant: str, model, variables, calib_images=None, masks=None, *,
             reduce_range: bool = True, observer: str = "histogram") -> Compressed:
    """The `variant` of one model: a registered name (`registry.RECIPES`) or `name=recipe` text,
    e.g. `p70=l1_global(amount=0.7)+quantize(weight_bits=4)`.

    Quantizing recipes calibrate on `calib_images` (normalised training images). `masks` (from
    `prune.py`) replace the masks that the pruning steps would compute; a recipe that prunes at
    amount=searched needs them (the level is searched on a population run), and recipes that do
    not prune take none. `reduce_range` and `observer` configure activation quantization (see
    `ptq.QuantConfig`).
    """
    from compax import methods  # noqa: F401  (registers the steps)
    from compax.compress import registry
    from compax.config import base_config
    from compax.errors import UserError

    name, recipe = registry.variant_recipe(variant)
    pruning = [s for s in recipe if getattr(s, "prunes", False)]
    if masks is not None and not pruning:
        raise UserError(f"variant {name} takes no masks: pass masks to the pruning variants only")
    if masks is None and any(s.amount == "searched" for s in pruning):
        raise UserError(f"variant {name} prunes at amount=searched, a level searched on a"
                        " population: pass its masks (compax.compress.global_l1_masks), or give"
                        " the step a fixed amount, e.g. l1_global(amount=0.5)")
    config = base_config()
    config.compress.reduce_range, config.compress.observer = reduce_range, observer
    # Shapes only (e.g. from jax.eval_shape) give the variant's shapes and static data.
    abstract = any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(variables))
    if abstract:
        population = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape), a.dtype), variables)
        calib = None if calib_images is None else jax.ShapeDtypeStruct(np.shape(calib_images),
                                                                       jnp.float32)
    else:
        population = jax.tree.map(lambda a: jnp.asarray(a)[None], variables)
        calib = None if calib_images is None else jnp.asarray(calib_images, jnp.float32)
    ctx = registry.Context(config=config, masks=masks, calib_images=calib, abstract=abstract)
    made = registry.run_recipe(recipe, model, population, ctx)
    if abstract:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), made.compressed)
    return jax.tree.map(lambda a: a[0], made.compressed)


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
        quantized_kernels=set(qstate.weight_scale) if qstate else None)


def compression_ratio(compressed: Compressed, variables) -> float:
    """Bytes of the dense float32 `variables` over bytes of the compressed variant."""
    return storage_bytes(variables) / size_bytes(compressed)
