"""Safe files: one run at a time per workdir, atomic writes, checksums, free space.

- `lock_workdir`: a run holds an exclusive `flock` on `<workdir>/.lock` while it runs; a second
  run on the same workdir is refused with one line. The kernel drops the lock when the holder
  exits, however it ends (SIGKILL included), so a killed run never leaves the workdir stuck.
- `write_json_atomic`, `write_text_atomic`: a temporary file beside the target, synced, then
  renamed over it, with the permissions of every other output (0o666 less the umask); a kill or
  a full disk leaves the old file or the new one, never half of one.
- `tree_checksums` / `verify_checksums`: the SHA-256 of every file of a folder (an orbax
  checkpoint), and the check of a folder against them that names the first file that differs.
- `check_free_space`: refuses a write that cannot fit, naming the folder and the space needed.
"""

import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import uuid

from compax.errors import UserError

LOCK_FILE = ".lock"
# The checksums of the files of a folder written by orbax (a checkpoint, a compressed variant).
MANIFEST = "compax_manifest.json"
_HASH_CHUNK = 1 << 24


class WorkdirLock:
    """An exclusive flock on a workdir's lock file, released by `release()`, at the end of a
    `with` block, or when collected."""

    def __init__(self, fd: int | None, path: pathlib.Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the flock
            self.fd = None

    def __del__(self):
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def make_workdir(workdir: pathlib.Path) -> None:
    """Creates `workdir` (and its parents) and checks that files can be written in it."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"workdir {workdir} is not writable ({e.strerror or e}): pass another"
                        " --workdir") from e


def lock_workdir(workdir: str | pathlib.Path, main_process: bool = True) -> WorkdirLock:
    """Creates `workdir` and takes its lock, or raises a UserError when another run (another
    process, or another thread of this one) holds it.

    Only the main process of a multi-host run locks (the others share its workdir). The lock is
    held until the returned object is released (use it in a `with` block).
    """
    workdir = pathlib.Path(workdir)
    make_workdir(workdir)
    path = workdir / LOCK_FILE
    if not main_process:
        return WorkdirLock(None, path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"workdir {workdir} is in use by another run (it holds {path}): wait until"
                        " that run ends, or pass another --workdir") from None
    except OSError as e:  # a file system without flock: run unlocked rather than not at all
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            raise
        os.close(fd)
        return WorkdirLock(None, path)
    return WorkdirLock(fd, path)


def _umask() -> int:
    """The process's umask, read without changing it where /proc says it."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, syncs it and renames it over `path`; the
    file gets the permissions of any other output (0o666 less the umask). On any error (a full
    disk) the temporary file is removed and `path` is left as it was."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: pathlib.Path, payload) -> None:
    """`payload` as indented JSON (no NaN: JSON has none), written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=1, allow_nan=False, default=_plain))


def _plain(value):
    """JSON form of numpy scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_json(path: pathlib.Path, what: str, fix: str):
    """The JSON in `path`; an unreadable or truncated file is a UserError naming it and `fix`."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not valid JSON, truncated or damaged"
        raise UserError(f"{what} {path} cannot be read ({reason}): {fix}") from e


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_checksums(directory: pathlib.Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{path relative to `directory`: SHA-256} of every file under `directory` but `skip`."""
    directory = pathlib.Path(directory)
    return {str(p.relative_to(directory)): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip}


def verify_checksums(directory: pathlib.Path, recorded: dict[str, str], what: str,
                     fix: str) -> None:
    """Raises a UserError naming the first file of `directory` that is missing or whose SHA-256
    differs from `recorded` (from `tree_checksums`)."""
    directory = pathlib.Path(directory)
    for name, digest in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            raise UserError(f"{what}: file {path} is missing: {fix}")
        actual = sha256_file(path)
        if actual != digest:
            raise UserError(f"{what}: file {path} fails its checksum (sha256 {actual[:12]}...,"
                            f" written as {digest[:12]}...): {fix}")


def check_free_space(directory: pathlib.Path, needed: int, what: str) -> None:
    """Raises a UserError when the file system of `directory` has less than `needed` bytes free."""
    directory = pathlib.Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), directory)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"no space for {what} in {directory}: it needs about {_mib(needed)},"
                        f" {_mib(free)} are free: free some space or pass a --workdir on a larger"
                        " disk (the run resumes where it stopped)")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
