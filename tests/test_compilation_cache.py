"""The persistent compilation cache: a second process loads the programs, with the CPU kernels."""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from compax.compilation_cache import enable_compilation_cache
    from compax.kernels import cpu_convolutions
    from compax.models import get_model, init_variables
    print("cache", enable_compilation_cache())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # fast machines compile fast
    model = get_model("lenet5", 43)
    variables = init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 32, 32, 3))

    @jax.jit
    def loss_and_grad(params):
        def loss(p):
            with cpu_convolutions():
                return jnp.mean(model.apply({**variables, "params": p}, x, train=False) ** 2)
        return jax.value_and_grad(loss)(params)

    value, grads = loss_and_grad(variables["params"])
    print("result", float(value), float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads))))
""")


def run_script(env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def results(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stdout.splitlines() if line.startswith("result")]


def test_a_second_process_reuses_the_compiled_programs_and_gets_the_same_numbers(tmp_path):
    cache = tmp_path / "jax"
    env = {**os.environ, "COMPAX_COMPILATION_CACHE": str(cache), "PYTHONPATH": str(ROOT)}

    def run():
        return results(run_script(env))

    first = run()
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing was cached"
    assert run() == first  # the same numbers from the cached programs ...
    assert sorted(p.name for p in cache.iterdir()) == entries  # ... and no new compilation
    env["COMPAX_COMPILATION_CACHE"] = "0"
    assert run() == first and sorted(p.name for p in cache.iterdir()) == entries


def test_a_damaged_entry_is_replaced_with_one_line_naming_it(tmp_path):
    """Garbage in every entry (as a run killed while JAX wrote them leaves): each is removed with
    one warning line naming its file, compiled and written again; the next run loads them."""
    cache = tmp_path / "jax"
    env = {**os.environ, "COMPAX_COMPILATION_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    first = results(run_script(env))
    entries = sorted(cache.glob("*-cache"))
    assert entries, "nothing was cached"
    for entry in entries:
        entry.write_bytes(b"garbage")
    damaged = run_script(env)
    assert results(damaged) == first
    warnings = [line for line in damaged.stderr.splitlines() if "compilation cache" in line]
    assert len(warnings) == len(entries), damaged.stderr[-3000:]
    for entry in entries:
        assert sum(f"entry {entry} was damaged" in line for line in warnings) == 1, warnings
        assert entry.read_bytes() != b"garbage"  # written again
    again = run_script(env)
    assert results(again) == first and "compilation cache" not in again.stderr
    assert sorted(cache.glob("*-cache")) == entries
