"""Fault injection: what survives a kill, what is verified on restore, what is refused up front.

The runs use a tiny fake GTSRB (3 classes x 3 tracks x 4 frames, `tests.test_data.make_fake_data`)
through a config file, so `launch.py` runs in a subprocess exactly as a user runs it. A refusal is
exit status 2 with exactly one line on stderr, no traceback, and every file of a finished workdir
unchanged. Kills are real SIGKILLs of a `launch.py` whose functions are wrapped to kill it at a
chosen point (`KILLER`), in the slow suite; the default suite reproduces the same windows in
process by raising at those points.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from compax import analyse_population, compress_population, pipeline, stages
from compax.compress import store
from compax.errors import UserError
from compax.safe_files import LOCK_FILE, lock_workdir
from compax.train import checkpoint
from compax.validate import MISSING, RULES, lookup, validate_config
from tests.test_data import _write_checksums, _write_npz, make_fake_data

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIG = """
from compax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "gtsrb"
    c.data_dir = {data_dir!r}
    c.population = 1
    c.max_epochs = 2
    c.batch_size = 8
    c.eval_batch_size = 64
    c.progress = False
    c.compress.variants = ("pruned", "w8a8")
    c.compress.sparsity_step = 0.25
    c.compress.calibration_images = 16
    c.analysis.analyses = "classes"
    return c
"""


class Killed(BaseException):
    """Stands for a SIGKILL in process: nothing after the raise runs (no `except Exception`)."""


def launch(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def workdir_hash(workdir: pathlib.Path) -> dict:
    """{path: SHA-256} of every file under `workdir`."""
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def assert_refused(result, *needles, alone=True):
    """Exit status 2, one error line holding every needle, no traceback; with `alone`, nothing
    else on stderr (no progress lines: the run was refused before any work)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 or not alone, result.stderr[-3000:]
    assert all(n in errors[0] for n in needles), errors[0]


TIMINGS = ("seconds", "train_step_seconds", "member_images_per_second", "images_per_second",
           "ort_images_per_second", "ort_speedup")


def _untimed(value):
    return {k: _untimed(v) for k, v in value.items() if k not in TIMINGS} if isinstance(value, dict) \
        else value


def comparable(results: dict) -> dict:
    """results.json without what differs between two fresh runs too: the stages' timings and
    machines, the inference, analysis and training timings, the bytes orbax's files take (OCDBT,
    timestamps)."""
    same = {k: v for k, v in results.items() if k not in ("stages", "inference", "analysis_seconds")}
    same["training"] = _untimed(results.get("training"))
    same["variants"] = {name: {k: _untimed(v) for k, v in fields.items()
                               if k != "bytes_on_disk_population"}
                        for name, fields in results["variants"].items()}
    return same


def metrics(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl without the seconds each epoch (and its train steps) took."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("seconds", "train_seconds")} for line in lines]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config file, a finished workdir of it, its results): the study on the fake GTSRB."""
    root = tmp_path_factory.mktemp("faults")
    data = make_fake_data(root / "datasets")
    config_file = root / "fault_config.py"
    config_file.write_text(CONFIG.format(data_dir=str(data)))
    workdir = root / "finished"
    results = pipeline.run(load_config(config_file), workdir)
    return config_file, workdir, results


def load_config(config_file: pathlib.Path, **overrides):
    namespace = {}
    exec(config_file.read_text(), namespace)  # noqa: S102 - the test's own config file
    config = namespace["get_config"]()
    for key, value in overrides.items():
        *parents, name = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[name] = value
    return config


def copy_of(workdir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    copy = tmp_path / "workdir"
    shutil.copytree(workdir, copy)
    return copy


# ---------------------------------------------------------------------------------------------
# Bad values and malformed data: refused before any work, the finished workdir untouched


def _malformed(data: pathlib.Path, split: str, **changes) -> None:
    """Rewrites the fake GTSRB `split` with some arrays changed, and its checksums to match."""
    path = data / "gtsrb" / f"{split}.npz"
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays.update(changes)
    _write_npz(path, **arrays)
    _write_checksums(data)


MALFORMED = {
    "float images": ("train", lambda a: {"image": a["image"].astype(np.float32)}, "array 'image'"),
    "28x28 images": ("test", lambda a: {"image": a["image"][:, :28, :28]}, "array 'image'"),
    "fewer labels": ("train", lambda a: {"label": a["label"][:-1]},
                     "different numbers of examples"),
    "label 43": ("test", lambda a: {"label": a["label"] + 43}, "outside 0..42"),
    "not an npz": ("test", None, "cannot be read"),
    "NaN in roi": ("test", lambda a: {"roi": np.where(np.arange(4) == 2, np.nan, a["roi"])},
                   "array 'roi' holds 6 non-finite values (NaN or inf)"),
    "inf in roi": ("train", lambda a: {"roi": np.where(np.arange(len(a["roi"]))[:, None] == 5,
                                                       np.inf, a["roi"])},
                   "array 'roi' holds 4 non-finite values (NaN or inf)"),
    "no test images": ("test", lambda a: {k: v[:0] for k, v in a.items()}, "holds no examples"),
    "one track per class": ("train", lambda a: {"track": np.zeros_like(a["track"])},
                            "the train split of gtsrb holds no images"),
}

BAD = [
    (["--config.learning_rate=-0.001"], "--config.learning_rate=-0.001"),
    (["--config.learning_rate=nan"], "--config.learning_rate=nan"),
    (["--config.learning_rate=inf"], "--config.learning_rate=inf"),
    (["--config.batch_size=0"], "--config.batch_size=0"),
    (["--config.batch_size=-8"], "--config.batch_size=-8"),
    (["--config.eval_batch_size=0"], "--config.eval_batch_size=0"),
    (["--config.max_epochs=0"], "--config.max_epochs=0"),
    (["--config.patience=0"], "--config.patience=0"),
    (["--config.population=0"], "--config.population=0"),
    (["--config.seed=-1"], "--config.seed=-1"),
    (["--config.model_width=0"], "--config.model_width=0"),
    (["--config.val_fraction=1.0"], "--config.val_fraction=1.0"),
    (["--config.compress.calibration_images=0"], "--config.compress.calibration_images=0"),
    (["--config.compress.sparsity_step=0"], "--config.compress.sparsity_step=0"),
    (["--config.compress.sparsity_step=1.5"], "--config.compress.sparsity_step=1.5"),
    (["--config.compress.sparsity_tolerance_pp=-1"], "--config.compress.sparsity_tolerance_pp"),
    (["--config.compress.prune_exclude=conv(1"], "--config.compress.prune_exclude"),
    (["--config.compress.prune_exclude=.*"], "excludes them all"),
    (["--config.compress.variants=('pruned','pruned')"], "--config.compress.variants"),
    (["--config.analysis.analyses=classes,hooker", "--config.analysis.hooker.alpha=0"],
     "--config.analysis.hooker.alpha"),
    (["--config.analysis.analyses=calibration", "--config.analysis.calibration.bins=0"],
     "--config.analysis.calibration.bins"),
    (["--config.analysis.analyses=attacks", "--config.analysis.attacks.iterations=0"],
     "--config.analysis.attacks.iterations"),
    (["--config.analysis.analyses=classes,embeddings", "--config.analysis.embeddings.per_class=3"],
     "--config.analysis.embeddings.per_class=3"),
    (["--config.compress.nonexist=1"], "unknown config key compress.nonexist in"
                                       " --config.compress.nonexist=1"),
    (["--config.population=2", "--config.nonexistent.key=1"], "in --config.nonexistent.key=1"),
    (["extra"], "unexpected argument 'extra'"),
    (["--config.model=alexnet"], "unknown model 'alexnet' in --config.model"),
    (["--config.dataset=mnist"], "unknown dataset 'mnist' in --config.dataset"),
    (["--config.stages=train,plot"], "unknown stage 'plot'"),
    (["--config.analysis.analyses=classes,lime"], "unknown analysis 'lime'"),
    (["--config.analysis.analyses=classes,hooker", "--config.analysis.hooker.correction=sidak"],
     "unknown correction 'sidak'"),
    (["--config.compress.observer=percentile"], "unknown observer 'percentile'"),
    (["--config.compress.variants=('pruned','w3a3')"], "w3a3"),
    (["--config.compress.variants=('pruned','w35=quantize(weight_bits=3.5)')"],
     "bad weight_bits=3.5: it takes a whole number of bits from 2 to 8"),
    (["--config.compress.variants=('pruned','a8=quantize(activation_bits=8.0)')"],
     "bad activation_bits=8.0"),
    (["--config.compress.variants=('pruned','d=dynamic_quantize(weight_bits=True)')"],
     "bad weight_bits=True"),
    (["--config.compress.variants=('pruned','d=dynamic_quantize(activation_bits=7.5)')"],
     "bad activation_bits=7.5"),
    (["--config.batch_size=1000000000"], "batch_size 1000000000 exceeds the 24 training images"),
    *[([f"--config.data_dir=MALFORMED/{name}"], needle) for name, (_, _, needle) in MALFORMED.items()],
    (["--config.data_dir=/nonexistent/data"], "/nonexistent/data"),
]


@pytest.fixture(scope="module")
def malformed_data(setup, tmp_path_factory):
    """Copies of the fake data, each with one malformed array (`MALFORMED`)."""
    config_file, _, _ = setup
    data = pathlib.Path(load_config(config_file).data_dir)
    root = tmp_path_factory.mktemp("malformed")
    for name, (split, change, _) in MALFORMED.items():
        copy = root / name
        shutil.copytree(data, copy)
        if change is None:
            (copy / "gtsrb" / f"{split}.npz").write_bytes(b"PK\x03\x04 truncated")
            _write_checksums(copy)
        else:
            with np.load(copy / "gtsrb" / f"{split}.npz") as npz:
                _malformed(copy, split, **change(dict(npz)))
    return root


# Rows also run through launch.py in the default suite (the others in the slow one).
THROUGH_LAUNCH = ("--config.learning_rate=-0.001", "unknown config key compress.nonexist in"
                  " --config.compress.nonexist=1", "unexpected argument 'extra'",
                  "unknown observer 'percentile'", "different numbers of examples")


def parsed(config_file: pathlib.Path, args: list[str]):
    """The config that launch.py makes of `--config=config_file *args` (None: args don't parse)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["launch.py", f"--config={config_file}", *args]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    try:
        positional = values(argv)[1:]
    except Exception:
        return None
    return None if positional else holder.value


@pytest.mark.parametrize("args, needle, through_launch", [
    *[pytest.param(args, needle, False, id=f"in process: {needle}") for args, needle in BAD],
    *[pytest.param(args, needle, True, id=f"launch.py: {needle}",
                   marks=[] if needle in THROUGH_LAUNCH else pytest.mark.slow)
      for args, needle in BAD]])
def test_bad_input_is_refused_in_one_line_before_any_work(setup, malformed_data, args, needle,
                                                          through_launch):
    config_file, workdir, _ = setup
    args = [a.replace("MALFORMED", str(malformed_data)) for a in args]
    before = workdir_hash(workdir)
    if through_launch:
        assert_refused(launch(f"--config={config_file}", f"--workdir={workdir}", *args), needle)
    else:
        config = parsed(config_file, args)
        if config is None:
            pytest.skip("refused by the flag parser: through launch.py only")
        with pytest.raises(UserError) as info:
            pipeline.run(config, workdir)
        assert needle in str(info.value) and "\n" not in str(info.value)
    assert workdir_hash(workdir) == before


def test_every_config_key_has_a_rule():
    from compax.analyses import ANALYSES
    from compax.config import base_config

    def keys(config, prefix=""):
        for k, v in config.items():
            if hasattr(v, "items"):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    checked_by_analyses = {f"analysis.{a.name}.{k}" for a in ANALYSES.values() for k in a.settings}
    assert set(keys(base_config())) <= set(RULES) | checked_by_analyses
    validate_config(base_config())  # the defaults are good
    for config in ("quickstart", "gtsrb_lenet", "cifar10_resnet"):
        namespace = {}
        exec((ROOT / "configs" / f"{config}.py").read_text(), namespace)  # noqa: S102
        validate_config(namespace["get_config"]())
    assert lookup(base_config(), "compress.nothing") is MISSING


def test_failed_runs_never_write_config_json(setup, tmp_path):
    config_file, _, _ = setup
    fresh = tmp_path / "fresh"
    assert_refused(launch(f"--config={config_file}", f"--workdir={fresh}",
                          "--config.batch_size=1000000000"), "lower --config.batch_size")
    assert not fresh.exists()  # checked against the data before the workdir is created
    with pytest.raises(UserError, match="bad --config.learning_rate"):
        pipeline.run(load_config(config_file, learning_rate=-1.0), tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------------------------
# Damaged run files: one line naming the file and the fix


DAMAGE = {
    "truncated config.json": (lambda w: _truncate(w / "config.json"), {}, "config.json"),
    "truncated stage record": (lambda w: _truncate(w / "stages" / "compress.json"), {},
                               "stages/compress.json"),
    "record missing a field": (lambda w: _drop_field(w / "stages" / "train.json", "outputs"), {},
                               "lacks its field 'outputs'"),
    "flipped checkpoint byte": (lambda w: _flip(_largest(w / "checkpoints" / "2")),
                                {"compress.sparsity_tolerance_pp": 2.0}, "fails its checksum"),
    "truncated checkpoint manifest": (
        lambda w: _truncate(w / "checkpoints" / "2" / checkpoint.MANIFEST),
        {"compress.sparsity_tolerance_pp": 2.0}, "compax_manifest.json cannot be read"),
    "flipped variant byte": (lambda w: _flip(_largest(w / "variants" / "w8a8")),
                             {"analysis.calibration.bins": 10}, "fails its checksum"),
}


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_field(path: pathlib.Path, field: str) -> None:
    record = json.loads(path.read_text())
    del record[field]
    path.write_text(json.dumps(record))


def _largest(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path, position: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40  # one bit: orbax and TensorStore restore such a file without complaint
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_run_file_is_one_error_naming_it(setup, tmp_path, damage):
    config_file, finished, _ = setup
    workdir = copy_of(finished, tmp_path)
    do, overrides, needle = DAMAGE[damage]
    do(workdir)
    before = workdir_hash(workdir)
    with pytest.raises(UserError, match=needle) as info:
        pipeline.run(load_config(config_file, **overrides), workdir)
    assert "\n" not in str(info.value) and str(workdir) in str(info.value)
    assert workdir_hash(workdir) == before


def test_flipped_checkpoint_through_launch_is_one_line_and_deleting_the_step_resumes(setup,
                                                                                   tmp_path):
    config_file, finished, _ = setup
    workdir = copy_of(finished, tmp_path)
    _flip(_largest(workdir / "checkpoints" / "2"))
    before = workdir_hash(workdir)
    args = (f"--config={config_file}", f"--workdir={workdir}", "--config.max_epochs=3",
            "--config.stages=train")  # training goes on from the flipped checkpoint
    assert_refused(launch(*args), "fails its checksum",
                   f"delete the folder {workdir / 'checkpoints' / '2'} to resume from epoch 1",
                   alone=False)  # after the progress lines of the stages that ran
    assert workdir_hash(workdir) == before
    shutil.rmtree(workdir / "checkpoints" / "2")
    resumed = launch(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint of epoch 1" in resumed.stderr
    assert metrics(workdir)[:2] == metrics(finished)  # epoch 2 trained again, the same


def test_compressed_variant_is_verified(tmp_path):
    population = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.ones(3, np.int8)}
    store.save_compressed(tmp_path / "v", population)
    back = store.restore_compressed(tmp_path / "v", population)
    np.testing.assert_array_equal(back["w"], population["w"])
    _flip(_largest(tmp_path / "v"))
    with pytest.raises(UserError, match=r"compressed variant .*/v: file .* fails its checksum.*"
                                        "run --config.stages=compress again"):
        store.restore_compressed(tmp_path / "v", population)
    (tmp_path / "v" / store.MANIFEST).unlink()
    with pytest.raises(UserError, match="has no checksums"):
        store.restore_compressed(tmp_path / "v", population)


# ---------------------------------------------------------------------------------------------
# Kills: each window of the train and compress stages, then a rerun ends with the same results


def _raise_at(monkeypatch, target, name, when):
    """Makes `target.name` raise Killed when `when(*args, **kwargs)` says so (before calling it)."""
    original = getattr(target, name)

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            raise Killed(name)
        return original(*args, **kwargs)
    monkeypatch.setattr(target, name, wrapper)


def _after_checkpoint_before_metrics(monkeypatch):
    original = checkpoint.PopulationCheckpoints.save

    def save(self, state, *args):
        original(self, state, *args)
        if int(state.epoch) == 2:
            raise Killed("after the checkpoint of epoch 2, before its metrics line")
    monkeypatch.setattr(checkpoint.PopulationCheckpoints, "save", save)


def _nth_call(n):
    calls = []

    def when(*args, **kwargs):
        calls.append(1)
        return len(calls) == n
    return when


WINDOWS = {
    "train: before the checkpoint of epoch 2": lambda m: _raise_at(
        m, checkpoint.PopulationCheckpoints, "save", lambda self, state, *a: int(state.epoch) == 2),
    "train: after orbax's commit, before the manifest": lambda m: _raise_at(
        m, checkpoint, "write_json_atomic", lambda path, *a: path.parent.name == "2"),
    "train: between the checkpoint and metrics.jsonl": _after_checkpoint_before_metrics,
    "train: before the stage record": lambda m: _raise_at(
        m, stages.StageRecords, "finish", lambda self, stage, *a, **k: stage == "train"),
    "train: between the stage record and results.json": lambda m: _raise_at(
        m, stages, "write_config", _nth_call(1)),
    "compress: after the first variant's orbax save, before its checksums": lambda m: _raise_at(
        m, store, "write_json_atomic", _nth_call(1)),
    "compress: between two variants": lambda m: _raise_at(
        m, store, "write_json_atomic", _nth_call(2)),
    "compress: before the stage record": lambda m: _raise_at(
        m, stages.StageRecords, "finish", lambda self, stage, *a, **k: stage == "compress"),
    "analyse: between two variants": lambda m: _raise_at(
        m, analyse_population, "save_part", lambda parts_dir, name, *a: name == "w8a8"),
}


@pytest.mark.parametrize("window", [
    pytest.param(w, marks=[] if w == "train: between the checkpoint and metrics.jsonl"
                 else pytest.mark.slow) for w in WINDOWS])
def test_interrupted_run_resumes_to_the_same_results(setup, tmp_path, window):
    """In process, by an exception; `test_sigkill_in_every_window_resumes_to_the_same_results`
    kills launch.py in the same windows."""
    config_file, finished, results = setup
    workdir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        WINDOWS[window](patch)
        with pytest.raises(Killed):
            pipeline.run(load_config(config_file), workdir)
    assert comparable(pipeline.run(load_config(config_file), workdir)) == comparable(results)
    assert metrics(workdir) == metrics(finished)
    assert sorted(p.name for p in workdir.iterdir()) == sorted(p.name for p in finished.iterdir())
    assert not [p for p in workdir.rglob("*") if "tmp" in p.name]  # no leftovers


def _record_calls(monkeypatch, target, name, calls: list, key):
    """Makes `target.name` append `key(*args)` to `calls`, then run as before."""
    original = getattr(target, name)

    def wrapper(*args, **kwargs):
        calls.append(key(*args))
        return original(*args, **kwargs)
    monkeypatch.setattr(target, name, wrapper)


def _made_name(*args):
    """The variant a real (not abstract) `run_recipe` call makes: its name argument."""
    return args[4] if len(args) > 4 else None


def test_a_rerun_makes_and_analyses_only_new_or_damaged_variants(setup, tmp_path):
    """Adding a variant to a finished run makes and analyses only it; the kept variants restore
    to the same results; a kept analysis whose arrays fail their checksum is computed again, and
    a saved variant whose files fail theirs is made again."""
    config_file, finished, results = setup
    workdir = copy_of(finished, tmp_path)
    made, analysed = [], []
    more = load_config(config_file, **{"compress.variants": ("pruned", "w8a8", "float16")})
    with pytest.MonkeyPatch.context() as patch:
        _record_calls(patch, compress_population, "run_recipe", made, _made_name)
        _record_calls(patch, analyse_population, "Compared", analysed, lambda name, *a: name)
        extended = pipeline.run(more, workdir)
    assert [n for n in made if n] == ["float16"] and analysed == ["float16"]
    for name in ("baseline", "pruned", "w8a8"):
        assert comparable(extended)["variants"][name] == comparable(results)["variants"][name]

    _flip(workdir / "analysis" / "parts" / "w8a8.npz")
    _flip(_largest(workdir / "variants" / "pruned"))
    made, analysed = [], []
    with pytest.MonkeyPatch.context() as patch:
        _record_calls(patch, compress_population, "run_recipe", made, _made_name)
        _record_calls(patch, analyse_population, "Compared", analysed, lambda name, *a: name)
        again = pipeline.run(load_config(config_file), workdir)
    assert [n for n in made if n] == ["pruned"] and sorted(analysed) == ["pruned", "w8a8"]
    assert comparable(again) == comparable(results)


@pytest.mark.slow
def test_outputs_half_rewritten_by_a_killed_run_are_not_taken_as_current(setup, tmp_path):
    """A run with other compress keys killed between two variants leaves one variant rewritten:
    the old compress record no longer matches its outputs, so the stage runs again."""
    config_file, finished, results = setup
    workdir = copy_of(finished, tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        WINDOWS["compress: between two variants"](patch)
        with pytest.raises(Killed):
            pipeline.run(load_config(config_file, **{"compress.sparsity_tolerance_pp": 50.0}),
                         workdir)
    records = stages.StageRecords(workdir, load_config(config_file))
    assert records.why_stale("compress") == "outputs changed since it finished"
    assert comparable(pipeline.run(load_config(config_file), workdir)) == comparable(results)


def test_checkpoints_beyond_max_epochs_are_refused(setup, tmp_path):
    config_file, finished, _ = setup
    workdir = copy_of(finished, tmp_path)
    before = workdir_hash(workdir)
    with pytest.raises(UserError, match="hold epoch 2, beyond --config.max_epochs=1: pass"
                                        " --config.max_epochs=2 or more"):
        pipeline.run(load_config(config_file, max_epochs=1), workdir)
    assert workdir_hash(workdir) == before


KILLER = textwrap.dedent("""
    import os, runpy, signal, sys
    sys.path.insert(0, os.getcwd())
    import pytest
    from tests import test_faults
    window = sys.argv.pop(1)

    class Kill(BaseException):
        def __init__(self, *args):  # where the in-process tests raise, this process dies
            os.kill(os.getpid(), signal.SIGKILL)
    test_faults.Killed = Kill
    test_faults.WINDOWS[window](pytest.MonkeyPatch())
    sys.argv[0] = "launch.py"
    runpy.run_path("launch.py", run_name="__main__")
""")


@pytest.mark.slow
@pytest.mark.parametrize("window", WINDOWS)
def test_sigkill_in_every_window_resumes_to_the_same_results(setup, tmp_path, window):
    config_file, finished, results = setup
    workdir = tmp_path / "run"
    args = (f"--config={config_file}", f"--workdir={workdir}")
    killed = subprocess.run([sys.executable, "-c", KILLER, window, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = launch(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert comparable(json.loads((workdir / "results.json").read_text())) == comparable(results)
    assert metrics(workdir) == metrics(finished)


# ---------------------------------------------------------------------------------------------
# One run per workdir


def test_a_busy_workdir_is_refused_and_a_killed_holder_leaves_no_lock(setup, tmp_path):
    config_file, finished, _ = setup
    workdir = copy_of(finished, tmp_path)
    before = workdir_hash(workdir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from compax.safe_files import lock_workdir;"
         f" lock = lock_workdir({str(workdir)!r}); print('locked', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_refused(launch(f"--config={config_file}", f"--workdir={workdir}"),
                       f"workdir {workdir} is in use by another run")
        with pytest.raises(UserError, match="in use by another run"):
            lock_workdir(workdir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_workdir(workdir).release()  # the kernel dropped the killed holder's lock
    assert workdir_hash(workdir) == before


@pytest.mark.slow
def test_two_runs_on_one_workdir(setup, tmp_path):
    """The first run is held in its first checkpoint until the second has been refused."""
    config_file, finished, results = setup
    workdir = tmp_path / "run"
    waiting, go = tmp_path / "waiting", tmp_path / "go"
    holder = textwrap.dedent(f"""
        import os, pathlib, runpy, sys, time
        sys.path.insert(0, os.getcwd())
        from compax.train import checkpoint
        save = checkpoint.PopulationCheckpoints.save

        def held(*args):
            pathlib.Path({str(waiting)!r}).touch()
            while not pathlib.Path({str(go)!r}).exists():
                time.sleep(0.05)
            save(*args)
        checkpoint.PopulationCheckpoints.save = held
        sys.argv[0] = "launch.py"
        runpy.run_path("launch.py", run_name="__main__")
    """)
    args = [f"--config={config_file}", f"--workdir={workdir}"]
    first = subprocess.Popen([sys.executable, "-c", holder, *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not waiting.exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = launch(*args)
    finally:
        go.touch()
    first_stderr = first.communicate(timeout=600)[1]
    assert first.returncode == 0, first_stderr[-3000:]
    assert_refused(second, f"workdir {workdir} is in use by another run")
    assert metrics(workdir) == metrics(finished)  # each epoch once
    assert comparable(json.loads((workdir / "results.json").read_text())) == comparable(results)


# ---------------------------------------------------------------------------------------------
# A full disk


def _mount_tmpfs(path: pathlib.Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("rerun", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_full_disk_is_one_line_and_a_rerun_with_space_finishes(setup, tmp_path, rerun):
    """On a 256 KiB tmpfs where mount is allowed (root); otherwise the free-space check is made
    to fail in process. With `rerun`, the disk then grows and the same command finishes."""
    config_file, _, results = setup
    disk = tmp_path / "disk"
    workdir = disk / "run"
    args = (f"--config={config_file}", f"--workdir={workdir}", "--config.stages=train")
    if _mount_tmpfs(disk, "256k"):
        try:
            assert_refused(launch(*args), f"no space for the checkpoint of epoch 1 in {workdir}",
                           "it needs about", alone=False)
            assert not [p for p in workdir.rglob("*") if "tmp" in p.name]  # nothing half-written
            if not rerun:
                return
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
            resumed = launch(*args)
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            done = json.loads((workdir / "results.json").read_text())
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    else:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(checkpoint, "check_free_space", _no_space)
            with pytest.raises(UserError, match="no space for"):
                pipeline.run(load_config(config_file, stages="train"), workdir)
        if not rerun:
            return
        done = pipeline.run(load_config(config_file, stages="train"), workdir)
    assert done["members"] == results["members"]
    baseline = done["variants"]["baseline"]  # as the train stage wrote it (analyse adds fields)
    assert baseline == {k: results["variants"]["baseline"][k] for k in baseline}


def _no_space(directory, needed, what):
    raise UserError(f"no space for {what} in {directory}: it needs about {needed} bytes")


def test_disk_full_midway_is_one_line_through_launch(setup, tmp_path):
    """ENOSPC from any writer (here the first: metrics.jsonl) is one line naming the workdir."""
    config_file, _, _ = setup
    workdir = tmp_path / "run"
    script = textwrap.dedent("""
        import errno, os, runpy, sys
        sys.path.insert(0, os.getcwd())
        from compax import safe_files

        def full(path, *args):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        safe_files.write_bytes_atomic = full
        sys.argv[0] = "launch.py"
        runpy.run_path("launch.py", run_name="__main__")
    """)
    result = subprocess.run([sys.executable, "-c", script, f"--config={config_file}",
                             f"--workdir={workdir}", "--config.stages=train"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert f"no space left on the disk of workdir {workdir} while writing" in lines[0]
    assert "Traceback" not in result.stderr


def test_run_files_have_the_permissions_of_other_outputs(setup):
    _, workdir, _ = setup
    mode = (workdir / "analysis" / "arrays.npz").stat().st_mode & 0o777
    for name in ("results.json", "config.json", "stages/train.json", "metrics.jsonl",
                 f"checkpoints/2/{checkpoint.MANIFEST}"):
        assert (workdir / name).stat().st_mode & 0o777 == mode, name
    assert not [p for p in workdir.rglob("*.tmp")]
    assert os.access(workdir / LOCK_FILE, os.R_OK)
