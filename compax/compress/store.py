"""Compressed populations on disk, as orbax checkpoints verified by checksums.

A `Compressed` pytree holds arrays (weights, scales, zero points) and static data (the variant, the
quantization config, the BatchNorm folds). Orbax stores the arrays; `structure.pkl` beside them
holds the rest of what restoring needs, pickled: the flax module that evaluates the variant, the
pytree with each array as a `jax.ShapeDtypeStruct` (static data included, the shapes that
restoring checks the files against) and what the recipe reported (`Variant.info`). A save
without it (compax before the structure was saved) is restored from the structure that tracing
the recipe abstractly gives (`jax.eval_shape`). Pickle runs code when read: restore only
workdirs you trust; the file is covered by the checksums, so a damaged one is never unpickled.
Beside orbax's files, `compax_manifest.json` holds
the SHA-256 of each of them; restoring checks them first, so a damaged file is an error that names
it, never a silently different model. The manifest may also hold a `record` (JSON) that the
writer attaches, e.g. which inputs made the variant and what was measured on it
(`compax/compress_population.py` resumes from it).
"""

import math
import pathlib
import pickle
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from compax.distributed import is_main_process
from compax.errors import UserError
from compax.safe_files import (
    MANIFEST,
    check_free_space,
    read_json,
    tree_checksums,
    verify_checksums,
    write_bytes_atomic,
    write_json_atomic,
)

STRUCTURE = "structure.pkl"


def save_compressed(path: pathlib.Path, compressed, record: dict | None = None, module=None,
                    info: dict | None = None) -> None:
    """Writes the arrays of `compressed` to the orbax checkpoint `path` (replaced if present),
    with `module` (the flax module evaluating it), the structure of `compressed` and `info` in
    `structure.pkl` when a module is given, then the checksums of its files with `record` (JSON,
    see `saved_record`).

    Orbax writes into a temporary folder and renames it when complete, and the checksums come
    last, so a killed save leaves no variant that restores; the stage record is written after
    every variant, so the compress stage runs again.
    """
    path = pathlib.Path(path).absolute()
    leaves = jax.tree.leaves(compressed)  # empty arrays (no activation points) are rebuilt
    arrays = {str(i): x for i, x in enumerate(leaves) if x.size}
    check_free_space(path.parent, int(1.1 * sum(x.nbytes for x in arrays.values())) + 2**20,
                     f"the compressed variant {path.name}")
    if is_main_process() and path.parent.is_dir():  # leftovers of a save killed midway
        for stale in path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, arrays, force=True)
    if is_main_process():
        if module is not None:
            like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), compressed)
            write_bytes_atomic(path / STRUCTURE, pickle.dumps((module, like, info or {})))
        manifest = {"sha256": tree_checksums(path, skip=(MANIFEST,))}
        if record is not None:
            manifest["record"] = record
        write_json_atomic(path / MANIFEST, manifest)


def saved_record(path: pathlib.Path) -> dict | None:
    """The `record` saved with the compressed variant at `path`; None when there is no complete
    save with a record (none yet, killed before its checksums, or a damaged manifest: the
    variant is then made again). Its files are verified when restored (`restore_compressed`)."""
    path = pathlib.Path(path) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path, "checksums of the compressed variant", "")
    except UserError:
        return None
    record = manifest.get("record") if isinstance(manifest, dict) else None
    return record if isinstance(record, dict) else None


def restore_saved(path: pathlib.Path):
    """(module, compressed population, info) saved at `path` with its structure, after checking
    its files against their checksums; None when the save holds no `structure.pkl` (then restore
    it with `restore_compressed` and the structure of the recipe traced abstractly)."""
    path = pathlib.Path(path).absolute()
    if not (path / STRUCTURE).is_file():
        return None
    _verify(path)
    try:
        module, like, info = pickle.loads((path / STRUCTURE).read_bytes())
    except Exception as e:  # a class renamed or removed since the save
        raise UserError(f"the structure of compressed variant {path} cannot be read"
                        f" ({type(e).__name__}: {e}): {_FIX}") from None
    return module, _restore_arrays(path, like), info


_FIX = "delete it and run --config.stages=compress again"


def _verify(path: pathlib.Path) -> None:
    """Checks the files of the saved variant at `path` against its checksums (UserError)."""
    fix, what = _FIX, f"compressed variant {path}"
    if not (path / MANIFEST).is_file():
        raise UserError(f"{what} has no checksums ({MANIFEST}; its save was interrupted or an"
                        f" older compax wrote it): {fix}")
    manifest = read_json(path / MANIFEST, "checksums of the compressed variant", fix)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), dict):
        raise UserError(f"checksums of the compressed variant {path / MANIFEST} are damaged: {fix}")
    verify_checksums(path, manifest["sha256"], what, fix)


def restore_compressed(path: pathlib.Path, like):
    """The compressed population saved at `path`, structured like `like` (e.g. from jax.eval_shape),
    after checking its files against their checksums."""
    path = pathlib.Path(path).absolute()
    _verify(path)
    return _restore_arrays(path, like)


def _restore_arrays(path: pathlib.Path, like):
    """The arrays of the (verified) save at `path` in the pytree structure of `like`."""
    what = f"compressed variant {path}"
    leaves, treedef = jax.tree.flatten(like)
    abstract = {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype) for i, x in enumerate(leaves)
                if math.prod(x.shape)}
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path, abstract)
    except Exception as e:  # orbax raises many types for unreadable or mismatched files.
        raise UserError(f"{what} cannot be restored ({type(e).__name__}): {_FIX}") from None
    return jax.tree.unflatten(treedef, [restored[str(i)] if str(i) in restored
                                        else jnp.zeros(x.shape, x.dtype) for i, x in enumerate(leaves)])
