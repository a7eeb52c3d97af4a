"""Compressed populations on disk, as orbax checkpoints.

A `Compressed` pytree holds arrays (weights, scales, zero points) and static data (the variant, the
quantization config, the BatchNorm folds). Orbax stores the arrays; the static data are rebuilt
from the config, by tracing the compression abstractly (`jax.eval_shape`), which also gives the
shapes that restoring checks the files against.
"""

import math
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from compax.errors import UserError


def save_compressed(path: pathlib.Path, compressed) -> None:
    """Writes the arrays of `compressed` to the orbax checkpoint `path` (replaced if present).

    Orbax writes into a temporary folder and renames it when complete, so a killed save leaves no
    checkpoint that looks finished.
    """
    leaves = jax.tree.leaves(compressed)  # empty arrays (no activation points) are rebuilt
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(pathlib.Path(path).absolute(),
                          {str(i): x for i, x in enumerate(leaves) if x.size}, force=True)


def restore_compressed(path: pathlib.Path, like):
    """The compressed population saved at `path`, structured like `like` (e.g. from jax.eval_shape)."""
    leaves, treedef = jax.tree.flatten(like)
    abstract = {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype) for i, x in enumerate(leaves)
                if math.prod(x.shape)}
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(pathlib.Path(path).absolute(), abstract)
    except Exception as e:  # orbax raises many types for unreadable or mismatched files.
        raise UserError(f"compressed variant {path} cannot be restored ({type(e).__name__}:"
                        f" {str(e).splitlines()[0][:200]}): delete it and run"
                        " --config.stages=compress again") from e
    return jax.tree.unflatten(treedef, [restored[str(i)] if str(i) in restored
                                        else jnp.zeros(x.shape, x.dtype) for i, x in enumerate(leaves)])
