"""The run behind launch.py: results.json's schema, and bad input through the command line."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from compax import pipeline
from compax.errors import UserError
from compax.stages import write_config
from tests.helpers import small_study, tiny_config, tiny_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("pruned", "w8a8", "pruned_w8a8")  # those of tests.helpers.small_study


def test_run_trains_compresses_analyses_and_reports(study_run):
    tmp_path, results = study_run
    assert json.loads((tmp_path / "results.json").read_text()) == results
    variants = results["variants"]
    assert set(variants) == {"baseline", *VARIANTS}
    base = variants["baseline"]
    assert base["params"] == 62_006 - 6 * 84 - 6  # LeNet-5 with 4 classes
    assert len(base["member_accuracy"]) == 2 and 0 <= base["accuracy"] <= 1
    for name in VARIANTS:
        v = variants[name]
        assert {"accuracy", "accuracy_diff_pp", "weight_bits", "activation_bits", "bytes",
                "compression_ratio", "sparsity", "member_accuracy"} <= set(v)
        assert v["bytes"] < base["bytes"] and v["compression_ratio"] > 1
    assert (variants["w8a8"]["weight_bits"], variants["pruned_w8a8"]["activation_bits"]) == (8, 8)
    search = results["sparsity_search"]
    assert variants["pruned"]["sparsity"]["amount"] == search["chosen"]
    chosen = search["levels"].index(search["chosen"]) if search["chosen"] else None
    if chosen is not None:  # the choice keeps validation accuracy within the tolerance
        assert search["val_accuracy"][chosen] >= search["baseline_val_accuracy"] - 0.01 - 1e-9
    assert results["members"][0]["seed"] == 0 and results["members"][1]["seed"] == 1
    for name in VARIANTS:  # the analyses' headline numbers, each analysis's under its name
        v = variants[name]
        classes, calibration, saliency = v["classes"], v["calibration"], v["saliency"]
        assert 0 <= classes["disagreement"] <= 1 and 0 <= calibration["ece"] <= 1
        assert -1 <= saliency["hcc_mean"] <= 1 + 1e-6
        assert {"max_class_acc_change_pp", "max_confusion_change_pp"} <= set(classes)
        assert {"confidence_diff", "delta_ece"} <= set(calibration)
        assert {"mad_mean", "roi_mass_change"} <= set(saliency) and "mad_mean" in v["gradcam"]
        hooker = v["hooker"]
        assert {"cie", "band"} <= set(hooker)
        assert isinstance(hooker["cie"]["significant_classes"], list) and hooker["cie"]["pies"] >= 0
        # Post-training variants are paired with their originals: paired tests beside Welch.
        assert hooker["cie"]["design"] == "paired" and hooker["cie"]["normalization"] == "subtract"
        assert set(hooker["cie"]["counts"]) == {"welch", "paired_t", "wilcoxon"}
        assert hooker["pie_claims"]["in_sample"]["cies"] == hooker["cie"]["pies"]
        assert hooker["pie_claims"]["held_out"] is None  # 2 members: no held-out halves
    assert results["skipped_analyses"] == {}  # all named, all apply to LeNet-5
    assert set(results["stages"]) == {"train", "compress", "analyse", "export", "report"}
    page = (tmp_path / "report" / "index.html").read_text()
    for image in re.findall(r"src='([^']+)'", page):
        assert (tmp_path / "report" / image).is_file(), image
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "Table 1" in summary and "Impacted classes per test and normalisation" in summary


def test_stages_are_skipped_when_current_and_rerun_when_their_config_changes(tmp_path, monkeypatch,
                                                                             caplog):
    monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: tiny_dataset())
    config = small_study()
    config.compress.variants = ("pruned", "w8a8")
    config.analysis.analyses = "classes"
    pipeline.run(config, tmp_path)
    records = {s: json.loads((tmp_path / "stages" / f"{s}.json").read_text()) for s in
               ("train", "compress", "analyse", "export", "report")}
    caplog.set_level("INFO")
    pipeline.run(config, tmp_path)
    assert all(f"stage {s}: up to date" in caplog.text for s in records)
    caplog.clear()
    config.compress.sparsity_tolerance_pp = 5.0
    pipeline.run(config, tmp_path)
    assert "stage train: up to date" in caplog.text
    assert "stage compress: running (config changed (compress))" in caplog.text
    assert "stage analyse: running (an earlier stage was run again)" in caplog.text
    after = {s: json.loads((tmp_path / "stages" / f"{s}.json").read_text()) for s in records}
    assert after["train"] == records["train"]
    assert after["compress"]["fingerprint"] != records["compress"]["fingerprint"]
    assert after["analyse"]["inputs"]["compress"] == after["compress"]["fingerprint"]


def test_a_stage_without_its_inputs_names_the_stage_to_run_first(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: tiny_dataset())
    config = small_study(stages="analyse,report")
    with pytest.raises(UserError, match="stage analyse needs the outputs of stage train, which is"
                                        " not run yet: run --config.stages=train,compress,analyse"):
        pipeline.run(config, tmp_path)
    with pytest.raises(UserError, match="unknown stage 'plot'"):
        pipeline.run(small_study(stages="train,plot"), tmp_path)


def test_workdir_of_another_run_is_refused(tmp_path):
    pipeline.prepare_workdir(tiny_config(), tmp_path)
    write_config(tmp_path, tiny_config())  # as the first stage that finishes does
    with pytest.raises(UserError, match="holds a population trained with seed=0, not 3"):
        pipeline.prepare_workdir(tiny_config(seed=3), tmp_path)
    pipeline.prepare_workdir(tiny_config(max_epochs=9), tmp_path)  # may grow on resume


def launch(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.mark.parametrize("args, env, message", [
    (["--config=configs/quickstart.py", "--config.nonexistent=1"], None,
     "unknown config key nonexistent"),
    (["--config=configs/quickstart.py", "--config.population=many"], None, "population"),
    (["--config=configs/nothere.py"], None, "config file configs/nothere.py does not exist"),
    (["--config=configs/gtsrb_lenet.py:huge"], None, "unknown config size 'huge'"),
    (["--config=configs/quickstart.py", "--config.model=alexnet"], None, "unknown model"),
    (["--config=configs/quickstart.py", "--config.dataset=mnist"], None, "mnist"),
    (["--config=configs/gtsrb_lenet.py"], {"COMPAX_DATA_DIR": "/nonexistent/data"},
     "COMPAX_DATA_DIR"),
    (["--config=configs/quickstart.py", "--workdir=/proc/compax"], None, "not writable"),
    (["--config=configs/quickstart.py", "--config.population=100000000"], None,
     "lower --config.population"),
    (["--config=configs/quickstart.py", "--config.stages=train,plot"], None, "unknown stage 'plot'"),
    (["--config=configs/quickstart.py", "--config.analysis.analyses=classes,lime"], None,
     "unknown analysis 'lime'"),
    (["--config=configs/quickstart.py", "--config.analysis.hooker.correction=sidak"], None,
     "unknown correction 'sidak'"),
])
def test_bad_input_is_one_line_and_exit_status_2(args, env, message, tmp_path):
    if not any(a.startswith("--workdir") for a in args):
        args = [*args, f"--workdir={tmp_path / 'run'}"]
    result = launch(*args, env=env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_nan_loss_stops_with_the_epoch_and_step_and_keeps_finished_work(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: tiny_dataset())
    with pytest.raises(UserError, match=r"training loss became (nan|inf) at epoch 1, step \d+"):
        pipeline.run(tiny_config(learning_rate=1e30, stages="train"), tmp_path)
    assert not (tmp_path / "stages" / "train.json").exists()


def test_corrupt_checkpoint_is_one_error_that_leaves_results_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: tiny_dataset())
    config = tiny_config(max_epochs=1, stages="train")
    pipeline.run(config, tmp_path)
    before = (tmp_path / "results.json").read_bytes()
    for path in (tmp_path / "checkpoints" / "1").rglob("*"):
        if path.is_file() and path.stat().st_size > 100:
            path.write_bytes(b"\0" * path.stat().st_size)
    config.max_epochs = 2  # training goes on from the corrupt checkpoint
    with pytest.raises(UserError, match="(cannot be read|fails its checksum).*delete the folder"):
        pipeline.run(config, tmp_path)
    assert (tmp_path / "results.json").read_bytes() == before


@pytest.mark.slow
def test_run_killed_mid_training_resumes_to_the_same_results(tmp_path):
    args = ["--config=configs/quickstart.py", "--config.population=1", "--config.max_epochs=3",
            "--config.compress.sparsity_step=0.25", "--config.analysis.analyses=classes,calibration",
            "--config.progress=False"]
    straight = launch(*args, f"--workdir={tmp_path / 'straight'}", timeout=1200)
    assert straight.returncode == 0, straight.stderr
    workdir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args,
                                f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (workdir / "checkpoints" / "1").exists() and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        process.kill()  # SIGKILL, mid-epoch 2
        process.wait()
    assert not (workdir / "results.json").exists()
    resumed = launch(*args, f"--workdir={workdir}", timeout=1200)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from the checkpoint of epoch" in resumed.stderr
    first = json.loads((tmp_path / "straight" / "results.json").read_text())
    second = json.loads((workdir / "results.json").read_text())
    assert first["variants"] == second["variants"] and first["members"] == second["members"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")),
                         ids=lambda p: p.stem)
def test_every_config_file_loads_and_passes_validation(path):
    from compax.validate import validate_config
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    validate_config(module.get_config())


def test_hooker_config_takes_members_and_the_gradual_epochs():
    from compax.config import hooker_config
    from compax.validate import validate_config
    config = hooker_config("cifar10", "members=10,gmp_epochs=60")
    validate_config(config)
    assert config.population == 10
    gradual = [v for v in config.compress.variants if v.startswith("gmp")]
    assert len(gradual) == 5 and all(v.endswith(f",epochs=60,patience={config.patience})")
                                     for v in gradual)
    assert not any("epochs" in v for v in hooker_config("cifar10", "members=4").compress.variants)
    for bad in ("members=1", "gmp_epochs=x", "width=2", "members=10;gmp_epochs=60"):
        with pytest.raises(ValueError, match="unknown config argument"):
            hooker_config("gtsrb", bad)


def test_configs_choose_the_paper_size_on_accelerators_and_the_cpu_size_on_the_cpu(monkeypatch, caplog):
    import jax

    from compax.config import study_config
    caplog.set_level("INFO")
    cpu = study_config("gtsrb", "resnet18")
    assert (cpu.model_width, cpu.patience) == (0.125, 4)
    assert "config size: cpu (chosen for the cpu backend" in caplog.text
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    paper = study_config("gtsrb", "resnet18")
    assert (paper.model_width, paper.patience, paper.max_epochs) == (1.0, 40, 500)
    assert study_config("gtsrb", "resnet18", "cpu").model_width == 0.125  # forced, even on a GPU


def test_an_analyse_stage_of_an_older_results_version_is_stale_with_its_kept_parts(study_run,
                                                                                   tmp_path):
    """A finished workdir whose analyse stage wrote results of an older layout or statistics
    (`stages.STAGE_VERSIONS`) runs analyse and report again, with no part kept."""
    from compax import analyse_population, stages
    from compax.safe_files import read_json, write_json_atomic

    workdir = tmp_path / "run"
    shutil.copytree(study_run[0], workdir)
    config = small_study()
    records = stages.StageRecords(workdir, config)
    assert records.is_current("analyse") and records.is_current("report")
    record = records.read("analyse")
    del record["version"]  # as a compax before versions wrote it
    record["fingerprint"] = stages.fingerprint(record["config"], record["inputs"])
    write_json_atomic(records.path("analyse"), record)
    assert not records.is_current("analyse") and not records.is_current("report")
    assert records.why_stale("analyse") == (
        f"its results are of version 1, this compax makes version {stages.STAGE_VERSIONS['analyse']}")
    parts = workdir / "analysis" / "parts"
    kept = read_json(parts / "w8a8.json", "analysis part", "")
    assert analyse_population.load_part(parts, "w8a8", kept["inputs"]) is not None
    kept["results_version"] = 1
    write_json_atomic(parts / "w8a8.json", kept)
    assert analyse_population.load_part(parts, "w8a8", kept["inputs"]) is None


def test_the_analyse_stage_restores_variants_as_compress_saved_them(study_run, tmp_path,
                                                                    monkeypatch):
    """Each saved variant holds its module, structure and info (`structure.pkl`, under the
    checksums): the analyse stage restores it without tracing its recipe again, to the arrays
    that were saved; a damaged structure file is named, never unpickled."""
    import jax
    import numpy as np

    from compax import compress_population
    from compax.compress.store import STRUCTURE, restore_saved

    workdir = tmp_path / "run"
    shutil.copytree(study_run[0], workdir)
    monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: tiny_dataset())
    run = pipeline.Run(small_study(), workdir)

    def traced(*args, **kwargs):
        raise AssertionError("a recipe was traced again")

    monkeypatch.setattr(compress_population, "abstract_variant", traced)
    loaded = run.load_populations()
    assert list(loaded) == list(VARIANTS)
    for name, (module, population, design) in loaded.items():
        saved_module, saved, info = restore_saved(workdir / "variants" / name)
        assert module == saved_module == run.trained.model and design == "paired"
        assert "sparsity" in info if name.startswith("pruned") else True
        for a, b in zip(jax.tree.leaves(population), jax.tree.leaves(saved), strict=True):
            np.testing.assert_array_equal(a, b)
    damaged = workdir / "variants" / "w8a8" / STRUCTURE
    damaged.write_bytes(damaged.read_bytes()[:-7] + b"garbage")
    with pytest.raises(UserError, match=f"{STRUCTURE}.*differs|checksum"):
        run.load_populations()


def test_a_run_parses_each_recipe_once(study_run, tmp_path, monkeypatch):
    """Validation parses `compress.variants` and the stages use what it parsed: one parse of
    each recipe per run (launch.py hands its validation's recipes to `pipeline.run`)."""
    from compax.compress import registry

    parsed = []
    original = registry.parse_recipe
    monkeypatch.setattr(registry, "parse_recipe",
                        lambda text, where, config=None: parsed.append(where) or original(
                            text, where, config))
    monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: tiny_dataset())
    workdir = tmp_path / "run"
    shutil.copytree(study_run[0], workdir)
    pipeline.run(small_study(), workdir)  # every stage current: validation only
    assert len(parsed) == len(VARIANTS)


def test_no_analysis_can_take_the_name_of_a_field_other_stages_write(study_run):
    """An analysis's results sit under its name beside the fields of the train and compress
    stages: every such field is reserved, and registering an analysis by one is refused."""
    from compax.analyses import ANALYSES, RESERVED_NAMES, Analysis, register_analysis

    for name, fields in study_run[1]["variants"].items():
        written = set(fields) - set(ANALYSES)
        assert written <= RESERVED_NAMES, (name, written - RESERVED_NAMES)

    class Accuracy(Analysis):
        name = "accuracy"

    with pytest.raises(ValueError, match="field of every variant's record"):
        register_analysis(Accuracy)
    assert "accuracy" not in ANALYSES


def test_the_export_stage_reads_only_the_variants_and_a_run_without_it_still_reports(
        study_run, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: tiny_dataset())
    workdir = tmp_path / "study"
    shutil.copytree(study_run[0], workdir)
    config = small_study(stages="export")
    config.export.members = "first"  # export again, analyses untouched
    results = pipeline.run(config, workdir)
    assert all(len(v["export"]["files"]) == 1 for v in results["variants"].values())
    records = pipeline.StageRecords(workdir, config)
    assert records.is_current("analyse") and not records.is_current("report")
    shutil.rmtree(workdir / "export")
    (workdir / "stages" / "export.json").unlink()
    config = small_study(stages="report")  # never exported: the report needs no export
    pipeline.run(config, workdir)
    assert "ONNX export" not in (workdir / "report" / "summary.md").read_text()
