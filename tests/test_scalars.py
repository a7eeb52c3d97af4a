"""TensorBoard scalars of the training loops, read back with tensorboard's reader (no TensorFlow)."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compax.compress.registry import Context, parse_recipe, run_recipe
from compax.models import get_model
from compax.train import fit, init_population
from compax.train.loop import SCALARS
from compax.train.population import variables_of
from compax.train.scalars import EVENT_FILES, ScalarWriter
from tests.helpers import tiny_config, tiny_dataset

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the reader of the event files: pip install -r requirements-dev.txt")


def read_scalars(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in `directory`; a step logged twice fails."""
    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag} logs a step twice: {steps}"
        scalars[tag] = {e.step: e.value for e in events}
    return scalars


def expected_scalars(metrics_lines: list[dict]) -> dict[str, dict[int, float]]:
    """What the event files should hold for these lines of metrics.jsonl (float32 values)."""
    expected = {}
    for record in metrics_lines:
        for name in SCALARS:
            values = np.asarray(record[name], np.float64)
            if values.ndim == 0:
                expected.setdefault(name, {})[record["epoch"]] = np.float32(values)
                continue
            finite = np.isfinite(values)
            for i in np.flatnonzero(finite):
                expected.setdefault(f"member_{i}/{name}", {})[record["epoch"]] = np.float32(values[i])
            if finite.any():
                expected.setdefault(f"mean/{name}", {})[record["epoch"]] = np.float32(
                    values[finite].mean())
    return expected


def test_writer_tags_members_and_mean_skips_nan_and_starts_its_directory_afresh(tmp_path):
    with ScalarWriter(tmp_path / "run") as writer:
        writer.write(1, {"val_loss": [1.0, 3.0], "seconds": 2.5})
        writer.write(2, {"val_loss": np.array([0.5, np.nan]), "other": [None, None]})
    assert read_scalars(tmp_path / "run") == {
        "member_0/val_loss": {1: 1.0, 2: 0.5}, "member_1/val_loss": {1: 3.0},
        "mean/val_loss": {1: 2.0, 2: 0.5}, "seconds": {1: 2.5}}
    with ScalarWriter(tmp_path / "run") as writer:  # a loop started again: the old files go
        writer.write(1, {"val_loss": [4.0]})
    assert len(list((tmp_path / "run").glob(EVENT_FILES))) == 1
    assert read_scalars(tmp_path / "run") == {"member_0/val_loss": {1: 4.0}, "mean/val_loss": {1: 4.0}}
    ScalarWriter(None).write(1, {"val_loss": [1.0]})  # writes nothing
    assert not list(tmp_path.glob("*.tfevents.*"))


def test_fit_logs_metrics_jsonl_as_scalars_and_a_resumed_run_logs_each_epoch_once(tmp_path):
    data = tiny_dataset(per_class=24)
    log_dir = tmp_path / "tensorboard" / "train"
    fit(tiny_config(population=2, max_epochs=1), data, tmp_path)
    fit(tiny_config(population=2, max_epochs=2), data, tmp_path)  # resumes from epoch 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert len(list(log_dir.glob(EVENT_FILES))) == 1
    got = read_scalars(log_dir)
    assert got == expected_scalars(lines)
    assert set(got["member_1/val_accuracy"]) == {1, 2}


def test_training_steps_log_under_variant_and_step(tmp_path):
    config = tiny_config(population=2)
    data = tiny_dataset(per_class=24)
    model = get_model(config.model, data.num_classes, config.model_width)
    state = init_population(model, optax.adam(1e-3), jnp.arange(2))
    ctx = Context(dataset=data, chunk=2, log_dir=tmp_path, seed=config.seed, batch_size=config.batch_size,
                  eval_batch_size=config.eval_batch_size)
    steps = parse_recipe("finetune(epochs=2)+finetune(epochs=1)+ablate(epochs=1)", "test", config)
    variant = run_recipe(steps, model, variables_of(state.params, state.batch_stats), ctx, "ft")
    tags = {f"{kind}/{name}" for kind in ("member_0", "member_1", "mean")
            for name in ("train_loss", "val_loss", "val_accuracy")}
    first, second, ablated = (read_scalars(tmp_path / "ft" / d)
                              for d in ("finetune", "finetune_2", "ablate"))
    assert set(first) == set(second) == set(ablated) == tags
    assert sorted(ablated["mean/val_loss"]) == [1]
    assert sorted(first["member_1/val_loss"]) == [0, 1, 2]  # epoch 0: the incoming weights
    assert sorted(first["member_1/train_loss"]) == [1, 2]
    # The validation losses are those the step reports (results.json; a repeated step's info
    # holds the last one's).
    history = variant.info["training"]["finetune"]["val_loss"]
    assert [second["member_1/val_loss"][1]] == [np.float32(h[1]) for h in history]
