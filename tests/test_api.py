"""The public API of `compax/__init__.py`: its examples run, its errors are one line, and
`import compax` imports nothing heavy."""

import doctest
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import compax
from compax import pipeline
from compax.errors import UserError
from compax.models import get_model
from tests.helpers import tiny_dataset

EXAMPLES = ("compax", "compax.load_run", "compax.compress_model", "compax.analyse")


@pytest.fixture
def quickstart_here(study_run, tmp_path, monkeypatch):
    """The session's small study as runs/quickstart of the working directory, loadable (its data
    is `tiny_dataset`, which the pipeline cannot load by name)."""
    workdir, _ = study_run
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(workdir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "load_dataset", lambda *args, **kwargs: tiny_dataset())
    return workdir


def test_every_public_function_has_examples():
    found = {test.name for test in doctest.DocTestFinder().find(compax) if test.examples}
    assert found == set(EXAMPLES)
    assert set(compax.__all__) == {"FinishedRun", "analyse", "compress_model", "load_run"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_run_on_a_finished_run(name, quickstart_here):
    (test,) = [t for t in doctest.DocTestFinder().find(compax) if t.name == name]
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, out=report.append)
    assert runner.failures == 0 and runner.tries == len(test.examples), "".join(report)


def test_import_compax_imports_no_numerical_library():
    code = "import sys, compax; print(sorted({'jax', 'numpy', 'flax'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert compax.FinishedRun.__name__ == "FinishedRun"  # imported when named
    with pytest.raises(AttributeError, match="no attribute 'Run'"):
        compax.Run  # noqa: B018


def test_a_workdir_without_a_finished_stage_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no finished stage.*launch.py"):
        compax.load_run(tmp_path)


def test_an_unknown_variant_or_a_stale_stage_is_one_line(study_run, tmp_path):
    workdir, _ = study_run
    run = compax.load_run(workdir)
    with pytest.raises(UserError, match="no variant 'w4a8': its variants are baseline, pruned, w8a8"):
        run.variant("w4a8")
    run.config.compress.sparsity_step = 0.05  # as if another config had made the variants
    stale = r"stage compress .* not up to date \(config changed .*--config.stages=train,compress$"
    with pytest.raises(UserError, match=stale):
        run.variant("pruned")


def test_compress_model_takes_recipe_text_and_asks_masks_of_a_searched_level_only():
    model = get_model("lenet5", 4)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
    fixed = compax.compress_model("p50=l1_global(amount=0.5)", model, shapes)
    assert fixed.variables["params"]["fc1"]["kernel"].shape == (400, 120)
    with pytest.raises(UserError, match="pruned prunes at amount=searched, .*: pass its masks"):
        compax.compress_model("pruned", model, shapes)
    with pytest.raises(UserError, match="unknown compression step 'l9'"):
        compax.compress_model("mine=l9(amount=0.5)", model, shapes)


def test_analyse_refuses_an_unknown_analysis_or_setting(study_run, monkeypatch):
    monkeypatch.setattr(pipeline, "load_dataset", lambda *args, **kwargs: tiny_dataset())
    run = compax.load_run(study_run[0])
    baseline = run.variant("baseline")
    with pytest.raises(UserError, match="unknown analysis 'lime'"):
        compax.analyse("lime", baseline, baseline, run.dataset)
    with pytest.raises(UserError, match="unknown analysis setting 'ece_bins' of calibration"):
        compax.analyse("calibration", baseline, baseline, run.dataset, ece_bins=5)
    with pytest.raises(UserError, match="calibration.bins must be an integer >= 1"):
        compax.analyse("calibration", baseline, baseline, run.dataset, bins=0)
