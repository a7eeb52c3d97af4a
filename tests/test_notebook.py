"""docs/quickstart_results.ipynb runs from top to bottom on a finished run, and what it prints is
what numpy computes from that run's predictions and what the run measured."""

import json
import pathlib

import nbclient
import nbformat
import numpy as np

import compax
from compax import pipeline
from tests.helpers import tiny_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart_results.ipynb"
# Run first in the kernel: the session's small study was made on `tiny_dataset`, which the
# pipeline cannot load by name (the fixture `study_run` replaces `load_dataset` likewise).
TINY_DATA = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
import compax.pipeline
from tests.helpers import tiny_dataset
compax.pipeline.load_dataset = lambda *args, **kwargs: tiny_dataset()"""


def test_quickstart_notebook_plots_and_prints_the_flip_rate_of_the_predictions(study_run,
                                                                                monkeypatch):
    workdir, results = study_run
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(TINY_DATA))
    monkeypatch.setenv("COMPAX_RUN", str(workdir))  # the kernel inherits the environment
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)
    printed = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    summary = json.loads(next(line for line in printed.splitlines() if line.startswith("{")))
    variant = summary["variant"]
    assert variant == "pruned"

    monkeypatch.setattr(pipeline, "load_dataset", lambda *args, **kwargs: tiny_dataset())
    run = compax.load_run(workdir)
    original, compressed = run.predictions("baseline"), run.predictions(variant)
    assert original.shape == compressed.shape == (2, len(tiny_dataset().test))
    np.testing.assert_array_equal(summary["flip_rate"], np.mean(original != compressed, axis=1))
    agreement = [np.mean(p[0] == p[1]) for p in (original, compressed)]  # two members: one pair
    np.testing.assert_allclose(summary["agreement"], agreement, rtol=1e-12)
    # ... and what the run itself measured on these predictions
    measured = results["variants"][variant]
    np.testing.assert_allclose(summary["accuracy"], measured["member_accuracy"], atol=1e-6)
    np.testing.assert_allclose(np.mean(summary["flip_rate"]), measured["classes"]["disagreement"],
                               atol=1e-6)
