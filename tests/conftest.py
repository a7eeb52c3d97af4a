"""Fixtures shared by the test files."""

import pytest

from compax import pipeline
from tests.helpers import small_study, tiny_dataset


@pytest.fixture(scope="session")
def study_run(tmp_path_factory):
    """(workdir, results) of one whole small study on `tiny_dataset`, run once per session."""
    workdir = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "load_dataset", lambda *a, **k: tiny_dataset())
        results = pipeline.run(small_study(), workdir)
    return workdir, results
