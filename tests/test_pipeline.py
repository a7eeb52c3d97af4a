"""The run behind launch.py: results.json's schema, and bad input through the command line."""

import importlib.util
import json
import os
import pathlib
import re
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
    for name in VARIANTS:  # the analyses' headline numbers
        v = variants[name]
        assert 0 <= v["disagreement"] <= 1 and 0 <= v["ece"] <= 1 and -1 <= v["hcc_mean"] <= 1 + 1e-6
        assert {"max_class_acc_change_pp", "max_confusion_change_pp", "confidence_diff",
                "delta_ece", "saliency_mad_mean", "roi_saliency_mass_change", "gradcam_mad_mean",
                "cie", "band"} <= set(v)
        assert isinstance(v["cie"]["significant_classes"], list) and v["cie"]["pies"] >= 0
        # Post-training variants are paired with their originals: paired tests beside Welch.
        assert v["cie"]["design"] == "paired" and v["cie"]["normalization"] == "subtract"
        assert set(v["cie"]["counts"]) == {"welch", "paired_t", "wilcoxon"}
        assert v["pie_claims"]["in_sample"]["cies"] == v["cie"]["pies"]
        assert v["pie_claims"]["held_out"] is None  # 2 members: no held-out halves
    assert set(results["stages"]) == {"train", "compress", "analyse", "report"}
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
               ("train", "compress", "analyse", "report")}
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
    (["--config=configs/quickstart.py", "--config.analysis.correction=sidak"], None,
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
