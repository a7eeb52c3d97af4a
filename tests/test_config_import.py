"""A config loads, and a mistyped key is refused, without the numerical libraries: `compax.config`
and the analyses' declarations it reads import neither jax nor optax, orbax, scipy or scikit-learn."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("jax", "optax", "orbax", "scipy", "sklearn")


def test_import_compax_config_imports_no_numerical_library():
    code = ("import sys, compax.config; compax.config.base_config();"
            f" print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_a_mistyped_key_is_one_line_and_exit_status_2(tmp_path):
    done = subprocess.run([sys.executable, "launch.py", "--config=configs/quickstart.py",
                           "--config.no_such_key=1", f"--workdir={tmp_path / 'run'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: unknown config key no_such_key in --config.no_such_key=1: the keys and their"
        " defaults are in compax/config.py"]
    assert not (tmp_path / "run").exists()
