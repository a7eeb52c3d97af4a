"""Runs an experiment config: `python launch.py --config=configs/gtsrb_resnet.py --workdir=DIR`.

Config keys are overridden with `--config.key=value` (e.g. `--config.population=8`). Bad input
(an unknown key, a bad value, missing data, an unwritable or busy workdir, damaged run files, a
full disk, ...) ends with a one-line error and exit status 2.
"""

import pathlib
import shutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from compax.errors import UserError, is_disk_full

# No default: config_flags would apply the --config.key overrides while defining the flag,
# before `parse_flags` can turn their errors into one line.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, configs/<name>.py[:size]; configs/quickstart.py needs"
    " no data files.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Output folder; default runs/<config name>. A rerun resumes it.")


def default_workdir(config_path: str) -> pathlib.Path:
    """runs/<config file stem>[_<size>] beside launch.py."""
    path, _, size = config_path.partition(":")
    name = pathlib.Path(path).stem + (f"_{size}" if size else "")
    return pathlib.Path(__file__).parent / "runs" / name


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with every config error (unknown key, wrong type, bad file) as one line."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = pathlib.Path(arg.removeprefix("--config=").partition(":")[0])
            if not path.is_file():
                _fail(f"config file {path} does not exist: pass --config=configs/<name>.py")
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # config_flags raises flags.Error, AttributeError, ValueError, ...
        _fail(_override_error(argv, e))


def _override_error(argv: list[str], error: Exception) -> str:
    """One line for a failed parse, naming the `--config.` argument that failed alone."""
    config = next((a for a in argv[1:] if a.startswith("--config=")), None)
    for arg in (a for a in argv[1:] if a.startswith("--config.")):
        one = [argv[0], *([config] if config else []), arg]
        alone = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=alone, sys_argv=one)
        try:
            alone(one)
        except Exception as e:
            error, culprit = e, arg
            break
    else:
        culprit = None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"  # drop tracebacks
    key = culprit and culprit.partition("=")[0].removeprefix("--config.")
    if culprit and (isinstance(error, (AttributeError, KeyError)) or "does not exist" in message
                    or "indices must be" in message):
        return (f"unknown config key {key} in {culprit}: the keys and their defaults are in"
                " compax/config.py")
    if culprit and culprit not in message:
        return f"{culprit}: {message}"
    return message


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected argument {argv[1]!r}: launch.py takes --config=FILE, --config.key=value"
              " and --workdir=DIR only")
    if _CONFIG.value is None:
        _fail("no config given: pass --config=configs/<name>.py (configs/quickstart.py needs no"
              " data files)")
    from compax.validate import validate_config

    try:
        recipes = validate_config(_CONFIG.value)  # bad values fail at once, before jax loads
    except UserError as e:
        _fail(str(e))
    from compax import pipeline  # after flag parsing and validation: importing jax is slow
    from compax.compilation_cache import enable_compilation_cache
    from compax.distributed import initialize_distributed

    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
    try:
        initialize_distributed()  # only where a cluster launcher (Slurm, mpirun, TPU pod) set it up
        enable_compilation_cache()
        pipeline.run(_CONFIG.value, workdir, recipes)  # validated once, above
    except UserError as e:
        _fail(str(e))
    except Exception as e:
        if not is_disk_full(e):
            raise
        _fail(_disk_full_message(pathlib.Path(workdir), e))


def _disk_full_message(workdir: pathlib.Path, error: BaseException) -> str:
    """One line for a disk that filled up while the run wrote (a checkpoint, a figure, ...)."""
    free = shutil.disk_usage(workdir if workdir.exists() else workdir.parent).free
    written = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file()) if workdir.exists() else 0
    while error is not None and getattr(error, "filename", None) is None:
        error = error.__cause__ or error.__context__
    where = f" while writing {error.filename}" if error is not None else ""
    return (f"no space left on the disk of workdir {workdir}{where} ({free / 2**20:.1f} MiB free,"
            f" the run's files so far take {written / 2**20:.1f} MiB): free some space or pass a"
            " --workdir on a larger disk; a rerun resumes where this one stopped")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    # Orbax reports every checkpoint step at INFO through absl, and JAX every accelerator it does
    # not find; keep compax's own lines readable (and an error alone on stderr).
    logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname and not (
        record.pathname.endswith("xla_bridge.py") and "Unable to initialize backend" in record.msg))
    app.run(main, flags_parser=parse_flags)
