"""Runs an experiment config: `python launch.py --config=configs/gtsrb_resnet.py --workdir=DIR`.

Config keys are overridden with `--config.key=value` (e.g. `--config.population=8`). Bad input
(an unknown key, missing data, an unwritable workdir, ...) ends with a one-line error and exit
status 2.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from compax.errors import UserError

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
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"  # drop tracebacks
        if isinstance(e, AttributeError):
            given = next((a for a in argv if a.startswith("--config.")), "--config.?")
            message = (f"unknown config key {message.strip(chr(39) + chr(34))} in {given}: the"
                       " keys and their defaults are in compax/config.py")
        _fail(message)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        _fail("no config given: pass --config=configs/<name>.py (configs/quickstart.py needs no"
              " data files)")
    from compax import pipeline  # after flag parsing: importing jax is slow
    from compax.distributed import initialize_distributed

    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
    try:
        initialize_distributed()  # only where a cluster launcher (Slurm, mpirun, TPU pod) set it up
        pipeline.run(_CONFIG.value, workdir)
    except UserError as e:
        _fail(str(e))


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    # Orbax reports every checkpoint step at INFO through absl; keep compax's own lines readable.
    logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
    app.run(main, flags_parser=parse_flags)
