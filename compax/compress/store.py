"""Compressed populations on disk, as orbax checkpoints verified by checksums.

A `Compressed` pytree holds arrays (weights, scales, zero points) and static data (the variant, the
quantization config, the BatchNorm folds). Its arrays are packed (`packing.py`: integer weights as
int8 or two 4-bit codes a byte, pruned ones as a bitmask and their non-zero entries, every array
checked to decode bit for bit) into one uint8 buffer, the one array of the orbax checkpoint
(`packed`); `packing.json` beside it holds the layout that unpacks it. `structure.pkl` holds the
rest of what restoring needs, pickled: the flax module that evaluates the variant, the
pytree with each array as a `jax.ShapeDtypeStruct` (static data included, the shapes that
restoring checks the files against) and what the recipe reported (`Variant.info`). A save
without it (compax before the structure was saved) is restored from the structure that tracing
the recipe abstractly gives (`jax.eval_shape`); a save without `packing.json` (compax before
packing) holds one orbax array per non-empty leaf, named by its index in the flattened pytree.
Pickle runs code when read: restore only
workdirs you trust; the file is covered by the checksums, so a damaged one is never unpickled.
Beside orbax's files, `compax_manifest.json` holds
the SHA-256 of each of them; restoring checks them first, so a damaged file is an error that names
it, never a silently different model. The manifest may also hold a `record` (JSON) that the
writer attaches, e.g. which inputs made the variant and what was measured on it
(`compax/compress_population.py` resumes from it).

Bytes on disk: the packed buffer takes the computed size (`compressed.size_bytes` times the
members: each kernel dense or as a bitmask, the smaller) but for the signs of zero weights (one bit
per zero, where one is negative), float32 arrays that size leaves out (the parameters of a folded
BatchNorm), kernels under about 3% dense (size counts them as CSR) and the zero points (size
counts 8 bytes per output channel, a scale and a zero point; here 4, the scale); orbax compresses
it (zstd, level 1): for the quickstart's variants its file is 0.91 to 0.96 times the computed
size. The fixed overhead of a variant, measured with orbax-checkpoint 0.12.8 for LeNet-5 (17
arrays): orbax's own files about 1.3 KB (checkpoint metadata, OCDBT manifests and index nodes),
`packing.json` about 80 bytes per array (0.7 to 1.4 KB), `structure.pkl` 1.2 to 2.1 KB,
`compax_manifest.json` about 1 KB of checksums plus its record (the variant's results, about 5 KB
in the quickstart): under 8 KiB without the record. `du` also counts orbax's 4 folders (4 KiB
each on ext4).
"""

import json
import math
import pathlib
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from compax.compress import packing
from compax.compress.compressed import Compressed
from compax.compress.paths import path_str
from compax.distributed import is_main_process, to_host
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
PACKING = "packing.json"  # the layout of the packed arrays (`packing.pack`)
PACKING_FORMAT = 1
PACKED = "packed"  # the one array of the orbax checkpoint: the packed buffer


def save_compressed(path: pathlib.Path, compressed, record: dict | None = None, module=None,
                    info: dict | None = None) -> None:
    """Writes the arrays of `compressed` packed (`packing.py`) to the orbax checkpoint `path`
    (replaced if present) with their layout in `packing.json`, with `module` (the flax module
    evaluating it), the structure of `compressed` and `info` in `structure.pkl` when a module is
    given, then the checksums of its files with `record` (JSON, see `saved_record`).

    Orbax writes into a temporary folder and renames it when complete, and the checksums come
    last, so a killed save leaves no variant that restores; the stage record is written after
    every variant, so the compress stage runs again.
    """
    path = pathlib.Path(path).absolute()
    keyed = jax.tree_util.tree_leaves_with_path(compressed)
    leaves = to_host([x for _, x in keyed])
    names = [path_str(p) for p, _ in keyed]
    buffer, layout = packing.pack(leaves, _quantized_kernels(compressed, names, leaves))
    buffer = buffer if buffer.size else np.zeros(1, np.uint8)  # orbax saves no empty array
    check_free_space(path.parent, int(1.1 * buffer.nbytes) + 2**20,
                     f"the compressed variant {path.name}")
    if is_main_process() and path.parent.is_dir():  # leftovers of a save killed midway
        for stale in path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {PACKED: buffer}, force=True)
    if is_main_process():
        write_bytes_atomic(path / PACKING, json.dumps(
            {"format": PACKING_FORMAT, "bytes": buffer.size, "leaves": layout},
            separators=(",", ":")).encode())
        if module is not None:
            like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), compressed)
            write_bytes_atomic(path / STRUCTURE, pickle.dumps((module, like, info or {})))
        manifest = {"sha256": tree_checksums(path, skip=(MANIFEST,))}
        if record is not None:
            manifest["record"] = record
        write_json_atomic(path / MANIFEST, manifest)


def _quantized_kernels(compressed, names: list[str], leaves: list) -> dict:
    """{index of an integer kernel: (index of its scale, the shape that broadcasts the scale along
    the kernel, bits)} for `packing.pack`, from the QuantState of a `Compressed` (leaf `names` as
    `paths.path_str` gives them; a leading member axis or none); empty for other pytrees."""
    if not isinstance(compressed, Compressed) or compressed.qstate is None \
            or compressed.weight_bits > 8:
        return {}
    index = {name: i for i, name in enumerate(names)}
    per_tensor = compressed.granularity == "per_tensor"
    kernels = {}
    for name in compressed.qstate.weight_scale:
        kernel, scale = index.get(f"variables/params/{name}"), index[f"qstate/weight_scale/{name}"]
        if kernel is None:
            continue
        members, channels = ((leaves[scale].shape, ()) if per_tensor
                             else (leaves[scale].shape[:-1], leaves[scale].shape[-1:]))
        ones = (1,) * (leaves[kernel].ndim - len(members) - len(channels))
        kernels[kernel] = (scale, (*members, *ones, *channels), compressed.weight_bits)
    return kernels


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
    """The arrays of the (verified) save at `path` in the pytree structure of `like`: packed
    (`packing.json`), or one orbax array per leaf as compax saved them before packing."""
    leaves, treedef = jax.tree.flatten(like)
    restore = _restore_packed if (path / PACKING).is_file() else _restore_plain
    return jax.tree.unflatten(treedef, restore(path, leaves))


def _restore_orbax(path: pathlib.Path, abstract: dict) -> dict:
    """The arrays of the orbax checkpoint `path` shaped as `abstract` (UserError if it cannot)."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, abstract)
    except Exception as e:  # orbax raises many types for unreadable or mismatched files.
        raise UserError(f"compressed variant {path} cannot be restored ({type(e).__name__}):"
                        f" {_FIX}") from None


def _restore_packed(path: pathlib.Path, leaves: list) -> list:
    """The arrays shaped as `leaves`, unpacked from the buffer and layout at `path`."""
    packed = read_json(path / PACKING, "layout of the compressed variant", _FIX)
    if packed.get("format") != PACKING_FORMAT:
        raise UserError(f"compressed variant {path} is packed in format {packed.get('format')!r},"
                        f" not {PACKING_FORMAT}: restore it with the compax that saved it, or"
                        f" {_FIX}")
    if [(tuple(h["shape"]), h["dtype"]) for h in packed["leaves"]] != \
            [(tuple(x.shape), np.dtype(x.dtype).name) for x in leaves]:
        raise UserError(f"compressed variant {path} holds other arrays than its variant has"
                        f" (another model or recipe): {_FIX}")
    buffer = _restore_orbax(path, {PACKED: jax.ShapeDtypeStruct((packed["bytes"],), np.uint8)})
    return [jnp.asarray(x) for x in packing.unpack(np.asarray(buffer[PACKED]), packed["leaves"])]


def _restore_plain(path: pathlib.Path, leaves: list) -> list:
    """The arrays shaped as `leaves` from a save of one orbax array per non-empty leaf, named by
    its index (empty leaves, e.g. no activation points, were not saved)."""
    restored = _restore_orbax(path, {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype)
                                     for i, x in enumerate(leaves) if math.prod(x.shape)})
    return [restored[str(i)] if str(i) in restored else jnp.zeros(x.shape, x.dtype)
            for i, x in enumerate(leaves)]
