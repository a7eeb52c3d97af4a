"""JAX's persistent compilation cache for compax runs: programs compiled once are read from disk.

A run compiles the same programs every time it starts (the train step, prediction, the pruning
search, every variant's model, each analysis); a resumed run, a rerun of a later stage, the next
seed's run and the six pairs of `experiments/six_pairs.py` all compile them again. With the cache
(`jax_compilation_cache_dir`), a program whose compilation took at least `MIN_COMPILE_SECONDS` is
written to `$COMPAX_COMPILATION_CACHE` (default `$COMPAX_CACHE_DIR/jax`, else
~/.cache/compax/jax) and later runs load it instead of compiling; JAX keys each entry by the
program, the compiler version and flags, and the device, so a changed program or another machine
compiles afresh. COMPAX_COMPILATION_CACHE=0 turns it off. The CPU kernels (`compax.kernels`) are
registered while a function is traced, which a cached program still is, so their custom calls
resolve as in a fresh compilation.
"""

import os
import pathlib

import jax
from absl import logging

MIN_COMPILE_SECONDS = 1.0


def cache_directory() -> pathlib.Path | None:
    """Where compiled programs are kept (module doc); None when the cache is turned off."""
    setting = os.environ.get("COMPAX_COMPILATION_CACHE")
    if setting == "0":
        return None
    if setting:
        return pathlib.Path(setting)
    root = os.environ.get("COMPAX_CACHE_DIR")
    return (pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "compax") / "jax"


def enable_compilation_cache() -> pathlib.Path | None:
    """Turns on JAX's persistent compilation cache in `cache_directory()`; returns it (or None)."""
    directory = cache_directory()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logging.warning("compilation cache %s unusable (%s): programs are compiled every run",
                        directory, e.strerror)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
