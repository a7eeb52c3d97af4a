"""The training loop: a population trained with Adam, early stopping, checkpoints and metrics.

One loop serves one seed and many: a run trains `config.population` members with seeds
`config.seed + i` in one program (`jax.vmap`), stops each member on its own validation loss, and
ends with every member's best-validation weights. Each epoch ends with an orbax checkpoint that
holds the metrics so far (`compax/train/checkpoint.py`), then a line in `metrics.jsonl`; a killed
run started again with the same workdir resumes from the last checkpoint, rewrites
`metrics.jsonl` from it, and ends with the same parameters and metrics as an uninterrupted run.
The same scalars go to TensorBoard event files in `<workdir>/tensorboard/train`
(`compax/train/scalars.py`), rewritten from the checkpoint on resume too (no epoch twice).
"""

import dataclasses
import json
import pathlib
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from compax.data import Dataset
from compax.distributed import default_mesh, is_main_process, replicate, shard_members, to_host
from compax.errors import UserError
from compax.member_vmap import (
    loss_and_accuracy,
    make_predict,
    model_apply,
    population_chunk,
    put_members,
    take_members,
    train_chunking,
)
from compax.models import get_model
from compax.safe_files import write_text_atomic
from compax.train.checkpoint import PopulationCheckpoints
from compax.train.early_stopping import update_early_stopping
from compax.train.population import (
    AUGMENT,
    DATA,
    DROPOUT,
    PopulationState,
    best_variables,
    init_population,
    member_keys,
    variables_of,
)
from compax.train.scalars import ScalarWriter
from compax.train.steps import epoch_order, make_train_steps, steps_per_call


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    """The trained population: `variables` hold every member's best-validation weights."""

    model: object
    state: PopulationState
    variables: dict
    seeds: np.ndarray
    history: list[dict]


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam (Kingma & Ba 2015) with PyTorch's defaults (b1 0.9, b2 0.999, eps 1e-8), as in the study."""
    return optax.adam(config.learning_rate)


def population_seeds(config: ml_collections.ConfigDict) -> np.ndarray:
    """Seeds of the members: config.seed, config.seed + 1, ..."""
    if config.population < 1:
        raise UserError(f"population must be >= 1, got {config.population}: set --config.population")
    return np.arange(config.population, dtype=np.int32) + config.seed


# The scalars of a metrics.jsonl record that go to TensorBoard (per member, and the epoch's seconds).
SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


def _scalars(record: dict) -> dict:
    return {k: record[k] for k in SCALARS}


def _metrics_line(record: dict) -> str:
    """One line of metrics.jsonl (NaN, for members that have stopped, as null)."""
    return json.dumps(record).replace("NaN", "null") + "\n"


def _write_metrics(path: pathlib.Path, history: list[dict]) -> None:
    """Makes metrics.jsonl hold exactly `history` (atomically; untouched when it already does)."""
    text = "".join(map(_metrics_line, history))
    if not path.is_file() or path.read_bytes() != text.encode():
        write_text_atomic(path, text)


def _check_finite(losses: np.ndarray, active: np.ndarray, epoch: int, seeds: np.ndarray) -> None:
    """Raises TrainingDiverged naming the first step whose loss is not finite for an active member."""
    bad = ~np.isfinite(losses) & active[None, :]
    if bad.any():
        step, member = np.argwhere(bad)[0]
        raise TrainingDiverged(
            f"training loss became {losses[step, member]} at epoch {epoch}, step {step} (seed"
            f" {seeds[member]}): lower --config.learning_rate or check the data; the checkpoint of"
            f" epoch {epoch - 1} is kept")


def check_batch_size(batch_size: int, train_images: int) -> None:
    """Raises a UserError when `batch_size` exceeds the `train_images` (an epoch of no step)."""
    if batch_size > train_images:
        raise UserError(f"batch_size {batch_size} exceeds the {train_images} training images:"
                        " lower --config.batch_size")


def fit(config: ml_collections.ConfigDict, dataset: Dataset, workdir: str | pathlib.Path,
        progress: bool = True, mesh: Mesh | None = None) -> TrainResult:
    """Trains the population described by `config` on `dataset`, resuming from `workdir`.

    The members are split over the devices of `mesh` (default: all of them, on every host); on a
    multi-host run every process calls `fit` alike and only the main process writes metrics.
    """
    workdir = pathlib.Path(workdir)
    mesh = mesh or default_mesh()
    model = get_model(config.model, dataset.num_classes, config.model_width)
    tx = make_optimizer(config)
    seeds = population_seeds(config)
    batch_size = config.batch_size
    check_batch_size(batch_size, len(dataset.train))
    steps = len(dataset.train) // batch_size

    state = shard_members(init_population(model, tx, jnp.asarray(seeds)), mesh)
    checkpoints = PopulationCheckpoints(workdir / "checkpoints")
    scalars = ScalarWriter(None)
    try:
        history = []
        if checkpoints.latest_epoch() is not None:
            state, history = checkpoints.restore(state)
            logging.info("Resuming from the checkpoint of epoch %d in %s", int(state.epoch), workdir)
            if int(state.epoch) > config.max_epochs:
                raise UserError(f"the checkpoints in {workdir} hold epoch {int(state.epoch)}, beyond"
                                f" --config.max_epochs={config.max_epochs}: pass"
                                f" --config.max_epochs={int(state.epoch)} or more, or a new --workdir")
        metrics_path = workdir / "metrics.jsonl"
        if is_main_process():
            _write_metrics(metrics_path, history)
        # A finished population is only restored: its files, event files included, stay untouched.
        if is_main_process() and int(state.epoch) < config.max_epochs and not bool(state.stopped.all()):
            scalars = ScalarWriter(workdir / "tensorboard" / "train")  # deletes its old event files
            for record in history:  # so a resumed run logs each epoch once
                scalars.write(record["epoch"], _scalars(record))
        trained_with = json.loads(json.dumps(config.to_dict()))

        # Each call trains `per_call` steps (one program for the epoch); on one CPU all members
        # in one program, vmapped a few at a time (`train_chunking`).
        chunk, group = train_chunking(config.population_chunk, len(seeds), mesh)
        per_call = steps_per_call(steps)
        train_steps = make_train_steps(model, tx, dataset.mean, dataset.std, config.augment, chunk,
                                       per_call, mesh, group)
        predict = make_predict(model_apply(model), dataset.mean, dataset.std, config.eval_batch_size,
                               population_chunk(config.population_chunk, len(seeds), mesh), mesh)
        images, labels = replicate((dataset.train.images, dataset.train.labels), mesh)
        data_keys = member_keys(jnp.asarray(seeds), DATA)
        aug_keys = member_keys(jnp.asarray(seeds), AUGMENT)
        dropout_keys = member_keys(jnp.asarray(seeds), DROPOUT)

        bar = tqdm(total=config.max_epochs, initial=int(state.epoch),
                   disable=not (progress and is_main_process()),
                   desc=f"train {config.model} x{len(seeds)}", unit="epoch", dynamic_ncols=True)
        while int(state.epoch) < config.max_epochs and not bool(state.stopped.all()):
            epoch = int(state.epoch) + 1
            active = ~to_host(state.stopped)
            start = time.perf_counter()
            # Only members that have not stopped train; the others keep their weights untouched.
            members = np.flatnonzero(active)
            order = epoch_order(data_keys[members], jnp.int32(epoch), len(dataset.train), steps,
                                batch_size)
            params, batch_stats, opt_state = take_members(
                (state.params, state.batch_stats, state.opt_state), members)
            step_losses, step_accuracies = [], []
            for first_step in range(0, steps, per_call):
                params, batch_stats, opt_state, loss, accuracy = train_steps(
                    params, batch_stats, opt_state, order, aug_keys[members], dropout_keys[members],
                    images, labels, jnp.int32(epoch), jnp.int32(first_step))
                step_losses.append(loss)  # (members, per_call)
                step_accuracies.append(accuracy)
            state = shard_members(state.replace(
                params=put_members(state.params, members, params),
                batch_stats=put_members(state.batch_stats, members, batch_stats),
                opt_state=put_members(state.opt_state, members, opt_state)), mesh)
            losses = np.full((steps, len(seeds)), np.nan, np.float32)
            losses[:, members] = to_host(jnp.concatenate(step_losses, axis=1)).T
            accuracies = np.full((steps, len(seeds)), np.nan, np.float32)
            accuracies[:, members] = to_host(jnp.concatenate(step_accuracies, axis=1)).T
            train_seconds = time.perf_counter() - start  # the steps are done: their losses are here
            _check_finite(losses, active, epoch, seeds)
            val_loss, val_accuracy = loss_and_accuracy(
                predict(variables_of(state.params, state.batch_stats), dataset.val.images),
                dataset.val.labels)
            state = update_early_stopping(state, jnp.asarray(val_loss), jnp.int32(config.patience))
            record = {
                "epoch": epoch,
                "seconds": round(time.perf_counter() - start, 3),
                "train_seconds": round(train_seconds, 3),
                "active": active.tolist(),
                "train_loss": losses.mean(0).tolist(),
                "train_accuracy": accuracies.mean(0).tolist(),
                "val_loss": np.where(active, val_loss, np.nan).tolist(),
                "val_accuracy": np.where(active, val_accuracy, np.nan).tolist(),
                "best_epoch": np.asarray(state.best_epoch).tolist(),
            }
            history.append(record)
            checkpoints.save(state, history, trained_with)  # the epoch's metrics go with it
            if is_main_process():  # a kill mid-line is repaired from the checkpoint on resume
                with metrics_path.open("a") as f:
                    f.write(_metrics_line(record))
                scalars.write(epoch, _scalars(record))
            bar.update(1)
            bar.set_postfix(loss=f"{np.nanmean(record['train_loss']):.3f}",
                            acc=f"{np.nanmean(record['train_accuracy']):.3f}",
                            val_loss=f"{np.nanmean(record['val_loss']):.3f}",
                            val_acc=f"{np.nanmean(record['val_accuracy']):.3f}",
                            active=int(active.sum()))
            logging.info("epoch %d: train loss %.4f acc %.4f, val loss %.4f acc %.4f, %d active, %.1fs",
                         epoch, np.nanmean(record["train_loss"]), np.nanmean(record["train_accuracy"]),
                         np.nanmean(record["val_loss"]), np.nanmean(record["val_accuracy"]),
                         active.sum(), record["seconds"])
        bar.close()
    finally:
        checkpoints.close()  # also on errors: orbax's threads would print tracebacks at exit
        scalars.close()
    return TrainResult(model=model, state=state, variables=best_variables(state), seeds=seeds,
                       history=history)
