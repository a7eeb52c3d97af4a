"""Compiles a kernel source file of this package into a shared library and registers its XLA FFI
handlers, the loader of both conv_cpu.cc and conv_onednn.cc.

A library is built once per source, flags and machine: `compile_and_register` names it
`<source stem>-<digest>.so` in `$COMPAX_CACHE_DIR` (default ~/.cache/compax), the digest hashing
the source and the headers beside it (image_ranges.h), the flags (-march=native: a library built
on one CPU may not run on another sharing the cache), the CPU's instruction sets and jaxlib's FFI
headers, and reuses it when it exists.
The compiler is `$CXX`, else g++ or c++.
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterable

import jax
from absl import logging

FLAGS = ("-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")


@functools.cache
def compiler() -> str | None:
    """The path of $CXX, else of g++ or c++; None (with one warning) if none is installed."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++"]
    path = next((path for path in map(shutil.which, names) if path), None)
    if path is None:
        logging.warning("no C++ compiler ($CXX, g++ or c++): the CPU kernels are off and XLA's "
                        "convolution is used, which is several times slower on the CPU")
    return path


def _cpu_features() -> bytes:
    """The CPU's instruction-set flags (Linux), else its name."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        return next(line for line in lines if line.startswith("flags")).encode()
    except (OSError, StopIteration):
        return platform.processor().encode()


def compile_and_register(source: pathlib.Path, targets: Iterable[str],
                         extra_flags: tuple[str, ...] = ()) -> bool:
    """Builds `source` (with FLAGS and `extra_flags`: include directories, libraries to link)
    unless built before, and registers the FFI handlers named `targets` for the CPU; False, with
    one warning, without a compiler or if compiling fails (callers then use XLA's convolution)."""
    path = compiler()
    if path is None:
        return False
    flags = FLAGS + extra_flags
    headers = b"".join(path.read_bytes() for path in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode()
                            + _cpu_features() + jax.ffi.include_dir().encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("COMPAX_CACHE_DIR", pathlib.Path.home() / ".cache/compax"))
    library = cache / f"{source.stem}-{digest}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = pathlib.Path(tmp) / library.name
            # Libraries (-l) after the source that uses them.
            command = [path, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), *extra_flags,
                       "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                logging.warning("compiling %s failed, XLA's convolution is used: %s",
                                source.name, next((line for line in result.stderr.splitlines()
                                                  if "error" in line), result.stderr.strip()))
                return False
            os.replace(built, library)  # atomic: concurrent processes see a whole library or none
    handle = ctypes.cdll.LoadLibrary(str(library))
    for target in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, target)),
                                    platform="cpu")
    return True
