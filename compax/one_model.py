"""One model compressed by a recipe: `compress`, the single-model face of the population engine.

The recipe runs as it does in a study (`compax.compress.registry.run_recipe`) on a population of
one member; the result is that member's `Compressed` (no member axis).
"""

import jax
import jax.numpy as jnp
import numpy as np

from compax import registrations  # noqa: F401  (registers the steps)
from compax.compress import registry
from compax.compress.compressed import Compressed
from compax.errors import UserError


def compress(variant: str, model, variables, calib_images=None, masks=None, *,
             reduce_range: bool = True, observer: str = "histogram") -> Compressed:
    """The `variant` of one model: a registered name (`registry.RECIPES`) or `name=recipe` text,
    e.g. `p70=l1_global(amount=0.7)+quantize(weight_bits=4)`.

    Quantizing recipes calibrate on `calib_images` (normalised training images). `masks` (from
    `prune.py`) replace the masks that the pruning steps would compute; a recipe that prunes at
    amount=searched needs them (the level is searched on a population run), and recipes that do
    not prune take none. `reduce_range` and `observer` configure activation quantization (see
    `ptq.QuantConfig`): they are the values of the quantize steps that the recipe leaves unset.
    """
    settings = {"compress": {"reduce_range": reduce_range, "observer": observer}}
    name, recipe = registry.variant_recipe(variant, settings)
    pruning = [s for s in recipe if getattr(s, "prunes", False)]
    if masks is not None and not pruning:
        raise UserError(f"variant {name} takes no masks: pass masks to the pruning variants only")
    if masks is None and any(s.amount == "searched" for s in pruning):
        raise UserError(f"variant {name} prunes at amount=searched, a level searched on a"
                        " population: pass its masks (compax.compress.global_l1_masks), or give"
                        " the step a fixed amount, e.g. l1_global(amount=0.5)")
    # Shapes only (e.g. from jax.eval_shape) give the variant's shapes and static data.
    abstract = any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(variables))
    if abstract:
        population = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape), a.dtype), variables)
        calib = None if calib_images is None else jax.ShapeDtypeStruct(np.shape(calib_images),
                                                                       jnp.float32)
    else:
        population = jax.tree.map(lambda a: jnp.asarray(a)[None], variables)
        calib = None if calib_images is None else jnp.asarray(calib_images, jnp.float32)
    ctx = registry.Context(masks=masks, calib_images=calib, abstract=abstract)
    made = registry.run_recipe(recipe, model, population, ctx)
    if abstract:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), made.compressed)
    return jax.tree.map(lambda a: a[0], made.compressed)
