"""JAX's persistent compilation cache for compax runs: programs compiled once are read from disk.

A run compiles the same programs every time it starts (the train step, prediction, the pruning
search, every variant's model, each analysis); a resumed run, a rerun of a later stage, the next
seed's run and the six pairs of `experiments/six_pairs.py` all compile them again. With the cache
(`jax_compilation_cache_dir`), a program whose compilation took at least `MIN_COMPILE_SECONDS` is
written to `$COMPAX_COMPILATION_CACHE` (default `$COMPAX_CACHE_DIR/jax`, else
~/.cache/compax/jax) and later runs load it instead of compiling; JAX keys each entry by the
program, the compiler version and flags, and the device, so a changed program or another machine
compiles afresh. COMPAX_COMPILATION_CACHE=0 turns it off. An entry that cannot be loaded (a run
killed while JAX wrote it, a damaged disk) is removed with one warning line naming its file, and
its program is compiled and written again (JAX alone warns and compiles at every run, never
replacing it: `LRUCache.put` keeps an existing file). The CPU kernels (`compax.kernels`) are
registered while a function is traced, which a cached program still is, so their custom calls
resolve as in a fresh compilation.
"""

import functools
import os
import pathlib

import jax
from absl import logging
from jax._src import compilation_cache as jax_cache

MIN_COMPILE_SECONDS = 1.0
# JAX's reader of an entry, `<directory>/<key>-cache` (jax/_src/lru_cache.py), that compax wraps.
_LOAD_ENTRY = jax_cache.get_executable_and_time


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
    jax_cache.get_executable_and_time = functools.partial(_load_or_remove, directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def _load_or_remove(directory: pathlib.Path, cache_key: str, *args, **kwargs):
    """JAX's `get_executable_and_time` (an executable and its compile time, or (None, None) where
    the entry is missing); an entry that fails to decompress or deserialize is removed, so that
    JAX compiles the program and writes the entry again."""
    try:
        return _LOAD_ENTRY(cache_key, *args, **kwargs)
    except Exception as e:  # zlib.error, zstd's errors, XlaRuntimeError, ...
        entry, why = directory / f"{cache_key}-cache", (str(e) or type(e).__name__).splitlines()[0]
        try:
            entry.unlink(missing_ok=True)
        except OSError as unlink_error:
            logging.warning("compilation cache entry %s is damaged (%s) and cannot be removed (%s):"
                            " delete it, or set COMPAX_COMPILATION_CACHE=0", entry, why,
                            unlink_error.strerror)
        else:
            logging.warning("compilation cache entry %s was damaged (%s): removed, its program is"
                            " compiled and cached again", entry, why)
        return None, None
