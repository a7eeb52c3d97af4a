"""Dataset files on disk: finding the data folder, checking files against SHA256SUMS, the cache.

The offline copies live in `<project root>/../shared/datasets` (see its README.md). A file is
checked against `SHA256SUMS` the first time it is loaded; a stamp in the cache folder, keyed by the
file's path, size and modification time, lets later loads skip the hash.
"""

import hashlib
import os
import uuid
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from compax.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "datasets"
DATA_DIR_ENV = "COMPAX_DATA_DIR"
CACHE_DIR_ENV = "COMPAX_CACHE_DIR"
CHECKSUMS_FILE = "SHA256SUMS"
README_HINT = "see ../shared/datasets/README.md"

_HASH_CHUNK = 1 << 24


def find_data_dir(data_dir: str | None = None) -> Path:
    """The folder holding the offline datasets.

    The first one given of: the `data_dir` argument (config `data_dir`), the `COMPAX_DATA_DIR`
    environment variable, `<project root>/../shared/datasets`. A given folder that does not exist is
    an error; it does not fall back to the next way.
    """
    given = [
        (source, value)
        for source, value in (("data_dir", data_dir), (DATA_DIR_ENV, os.environ.get(DATA_DIR_ENV)))
        if value
    ]
    source, value = given[0] if given else ("the default", str(DEFAULT_DATA_DIR))
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(
            f"data folder {path} ({source}) does not exist: pass data_dir / --config.data_dir, "
            f"set {DATA_DIR_ENV}, or put the offline copy in {DEFAULT_DATA_DIR} ({README_HINT})"
        )
    return path


def cache_dir() -> Path:
    """The folder for derived files (decoded images, checksum stamps): `$COMPAX_CACHE_DIR` or
    `~/.cache/compax`."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "compax").expanduser()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes `path` through `write(file)` to a temporary name, then renames it into place, so
    readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(
            f"cannot write {path} ({e.strerror or e}): set {CACHE_DIR_ENV} to a writable folder"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    """The sha256 hex digest of an array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def missing_file_error(what: str, path: Path) -> UserError:
    """The error for a dataset file that is not there, saying the ways to provide it."""
    return UserError(
        f"{what} file {path} is missing: put the offline copy in {path.parent} ({README_HINT}) "
        f"or set {DATA_DIR_ENV} / --config.data_dir, "
        "or run online with download=True to build it with tensorflow-datasets"
    )


def _expected_sha256(data_dir: Path, relpath: str, what: str) -> str:
    """The checksum that `data_dir/SHA256SUMS` gives for `relpath`."""
    sums_path = data_dir / CHECKSUMS_FILE
    if not sums_path.is_file():
        raise UserError(
            f"{sums_path} is missing: copy it with the {what} files from the offline copy "
            f"({README_HINT})"
        )
    for line in sums_path.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.lstrip("*") == relpath:
            return digest.lower()
    raise UserError(
        f"{sums_path} has no checksum for {relpath}: copy SHA256SUMS again from the offline copy "
        f"({README_HINT})"
    )


def _stamp_path(path: Path, expected: str) -> Path:
    """Where the stamp saying "this version of `path` hashes to `expected`" lives."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{expected}"
    return cache_dir() / "verified" / hashlib.sha256(key.encode()).hexdigest()


def verified_file(data_dir: Path, relpath: str, what: str) -> Path:
    """`data_dir / relpath`, after checking it exists and matches its line in `SHA256SUMS`.

    `what` names the dataset in error messages ("GTSRB"). The hash is computed once per version of
    the file (path, size, modification time); later calls find the stamp in the cache folder.
    """
    path = data_dir / relpath
    if not path.is_file():
        raise missing_file_error(what, path)
    expected = _expected_sha256(data_dir, relpath, what)
    stamp = _stamp_path(path, expected)
    if stamp.is_file():
        return path
    actual = sha256_file(path)
    if actual != expected:
        raise UserError(
            f"{what} file {path} fails its checksum (sha256 {actual[:16]}..., "
            f"{CHECKSUMS_FILE} says {expected[:16]}...): copy it again from the offline copy "
            f"({README_HINT}) or run online with download=True"
        )
    atomic_write(stamp, lambda f: f.write(actual.encode()))
    return path


def read_npz(path: Path, keys: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """The arrays `keys` of the .npz file `path`; an unreadable file or a missing array is a
    UserError."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise UserError(
                    f"{what} file {path} lacks the arrays {missing}: copy it again from the "
                    f"offline copy ({README_HINT})"
                )
            return {k: npz[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(
            f"{what} file {path} cannot be read ({type(e).__name__}: {e}): copy it again from the "
            f"offline copy ({README_HINT})"
        ) from e


def check_arrays(
    path: Path,
    arrays: dict[str, np.ndarray],
    shapes: dict[str, tuple[tuple, str]],
    what: str,
    num_classes: int,
) -> None:
    """Raises a UserError naming `path` when its arrays are not what the loader needs.

    `shapes` gives, per array, its shape (ints; "N" for the number of examples, "N+1" for one
    more) and the numpy dtype kinds it may have ("u" unsigned, "i" signed integers, "f" floats;
    "u1" exactly uint8). Float arrays must hold finite values only (no NaN or inf), every array
    must agree on N, N must be at least 1, and `label` must lie in [0, num_classes).
    """
    fix = f"copy it again from the offline copy ({README_HINT}) or run online with download=True"
    counts = {}
    for key, (shape, kinds) in shapes.items():
        a = arrays[key]
        dtype_ok = a.dtype == np.uint8 if kinds == "u1" else a.dtype.kind in kinds
        dims_ok = a.ndim == len(shape) and all(
            isinstance(s, str) or s == d for s, d in zip(shape, a.shape, strict=False)
        )
        if not (dtype_ok and dims_ok):
            wanted = "x".join(map(str, shape))
            raise UserError(
                f"{what} file {path}: array {key!r} is {a.shape} {a.dtype}, not ({wanted}) "
                f"{'uint8' if kinds == 'u1' else 'of dtype kind ' + kinds}: {fix}"
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UserError(
                f"{what} file {path}: array {key!r} holds {np.count_nonzero(~np.isfinite(a))} "
                f"non-finite values (NaN or inf): {fix}"
            )
        for s, d in zip(shape, a.shape, strict=True):
            if s in ("N", "N+1"):
                counts[key] = d - (s == "N+1")
    if len(set(counts.values())) > 1:
        sizes = ", ".join(f"{k} {n}" for k, n in counts.items())
        raise UserError(f"{what} file {path} holds different numbers of examples ({sizes}): {fix}")
    if 0 in counts.values():
        raise UserError(f"{what} file {path} holds no examples: {fix}")
    labels = arrays.get("label")
    if labels is not None and labels.size and not (0 <= labels.min() and labels.max() < num_classes):
        raise UserError(
            f"{what} file {path} has labels from {labels.min()} to {labels.max()}, outside 0.."
            f"{num_classes - 1}: {fix}"
        )
