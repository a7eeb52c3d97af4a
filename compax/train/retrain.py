"""Training of an incoming population inside a recipe step (gmp, finetune, qat, distill, ablate),
resumable.

`train_population` trains every member of a population for a fixed number of epochs with a given
optax transformation on its `Trainable`'s loss (cross-entropy, or a distillation loss), each member
with its own streams of seed `seed + i` (`compax.train.population`: data order, augmentation,
dropout; the same streams as the baseline member), several steps per call through
`make_train_steps`, the members chunked as the baseline's (`train_chunking`). Early
stopping keeps each member's weights of the epoch with the lowest validation loss (`patience`
None: never stop early, keep the best epoch);
with `start_candidate` the incoming weights are the epoch-0 candidate (the step never makes
validation loss worse), and epochs before `first_candidate_epoch` are never candidates.

Each epoch's training loss (mean over its steps), validation loss and validation accuracy per
member go to TensorBoard event files in `log_dir` (`compax/train/scalars.py`).

Resumption. With a `checkpoint_dir`, every epoch ends with a checkpoint of the whole training state
(weights, optimizer state with its masks and schedule count, the best weights and early-stopping
counters) and the per-epoch record, verified by checksums when read (`PopulationCheckpoints`, as
the baseline's training). A step killed at any instant and run again resumes after its last
finished epoch and ends with the same weights as an uninterrupted run (the data order of epoch e
depends only on the member's seed and e); a finished step is restored from its last checkpoint
without training. A checkpoint is taken only if it was made by the same training: its manifest
records `identity` (the step's settings), the run's training settings and a SHA-256 of the incoming
weights and optimizer state; any other checkpoint folder is discarded, with a log line, and the step
trains from the start.
"""

import dataclasses
import hashlib
import json
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from compax.data import Dataset
from compax.errors import UserError
from compax.member_vmap import loss_and_accuracy, make_predict, train_chunking
from compax.train.checkpoint import PopulationCheckpoints, recorded_config
from compax.train.early_stopping import update_early_stopping
from compax.train.population import AUGMENT, DATA, DROPOUT, PopulationState, member_keys, variables_of
from compax.train.scalars import ScalarWriter
from compax.train.steps import cross_entropy, epoch_order, make_train_steps, steps_per_call

SELECT = ("loss", "accuracy")
SCALARS = ("train_loss", "val_loss", "val_accuracy")  # per member, to TensorBoard


class Trainable:
    """How a model trains: `apply(variables, x, train, mutable, rngs) -> (logits, updates)` as
    `make_train_step` calls it, `loss(logits, labels, variables, x)`, the objective it minimises
    (`make_member_step`'s `loss`; here the softmax cross-entropy), and `evaluate(variables, x) ->
    logits` for validation."""

    def __init__(self, model):
        self.model = model

    def apply(self, variables, x, train, mutable, rngs):
        return self.model.apply(variables, x, train=train, mutable=mutable, rngs=rngs)

    def loss(self, logits, labels, variables, x):
        return cross_entropy(logits, labels, variables, x)

    def evaluate(self, variables, x):
        return self.model.apply(variables, x, train=False)


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """The run's settings a step trains with, and where it writes its scalars and checkpoints."""

    dataset: Dataset
    batch_size: int
    eval_batch_size: int
    seed: int
    augment: bool
    chunk: int = 1  # members vmapped together in prediction
    log_dir: pathlib.Path | None = None
    checkpoint_dir: pathlib.Path | None = None
    population_chunk: int = 0  # config.population_chunk: the train steps' (`train_chunking`)

    @classmethod
    def of(cls, ctx) -> "TrainingRun":
        """The settings of a recipe `Context` (its dataset, training procedure, chunk and the
        step's directories)."""
        if ctx.dataset is None:
            raise UserError("training steps need the run's dataset: run them inside a population run")
        return cls(ctx.dataset, ctx.batch_size, ctx.eval_batch_size, ctx.seed, bool(ctx.augment),
                   ctx.chunk, ctx.step_log_dir, ctx.step_checkpoint_dir, ctx.population_chunk)

    def settings(self) -> dict:
        """What, beyond the step and its inputs, decides the training (for the checkpoints)."""
        return {"batch_size": self.batch_size, "seed": self.seed, "augment": self.augment,
                "train_images": len(self.dataset.train), "val_images": len(self.dataset.val)}


@dataclasses.dataclass
class Trained:
    """A trained population: each member's best params and batch stats, the final optimizer state
    and the cost of the training (`info`)."""

    params: dict
    batch_stats: dict
    opt_state: Any
    info: dict


def tree_digest(tree) -> str:
    """SHA-256 of a pytree's structure (static fields included) and every leaf's bytes."""
    digest = hashlib.sha256(str(jax.tree.structure(tree)).encode())
    for leaf in jax.tree.leaves(tree):
        array = np.asarray(leaf)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _open_checkpoints(directory: pathlib.Path | None, fingerprint: dict) -> PopulationCheckpoints | None:
    """The step's checkpoints, after discarding a folder that another training wrote."""
    if directory is None:
        return None
    directory = pathlib.Path(directory)
    if directory.exists() and recorded_config(directory) not in (None, fingerprint):
        logging.warning("the checkpoints in %s come from other settings or inputs: discarded",
                        directory)
        shutil.rmtree(directory)
    return PopulationCheckpoints(directory, keep=1)


def train_population(trainable, tx: optax.GradientTransformation, params, batch_stats,
                     run: TrainingRun, *, epochs: int, patience: int | None, identity: dict,
                     learning_rate_note: float, start_candidate: bool,
                     first_candidate_epoch: int = 1, opt_state=None, select: str = "loss") -> Trained:
    """Trains every member of `params` (leading member axis) for `epochs` epochs (module doc).

    `identity` (JSON) names the training for its checkpoints, e.g. the step's recipe text.
    `select`: the validation criterion of early stopping, "loss" (cross-entropy) or "accuracy"
    (the epoch with the lowest validation error 1 - accuracy; ties keep the earlier epoch).
    Returns the best weights and the cost: optimizer steps, epochs, wall seconds (compilation
    included; summed over resumed runs) and training images per second over all members.
    """
    dataset, batch_size = run.dataset, run.batch_size
    steps = len(dataset.train) // batch_size
    if steps == 0:
        raise UserError(f"batch_size {batch_size} exceeds the {len(dataset.train)} training images:"
                        " lower the batch size")
    size = jax.tree.leaves(params)[0].shape[0]
    seeds = jnp.arange(size, dtype=jnp.int32) + run.seed
    opt_state = jax.vmap(tx.init)(params) if opt_state is None else opt_state
    predict = make_predict(trainable.evaluate, dataset.mean, dataset.std, run.eval_batch_size,
                           run.chunk)

    if select not in SELECT:
        raise UserError(f"select must be one of {', '.join(SELECT)}, got {select!r}")

    def validate(p, b):
        """(loss, accuracy, the early-stopping criterion) per member on the validation set."""
        loss, accuracy = map(jnp.asarray, loss_and_accuracy(
            predict(variables_of(p, b), dataset.val.images), dataset.val.labels))
        return loss, accuracy, (loss if select == "loss" else 1.0 - accuracy)

    fingerprint = json.loads(json.dumps({
        "identity": identity, "settings": run.settings(), "epochs": epochs, "patience": patience,
        "select": select,
        "start_candidate": start_candidate, "first_candidate_epoch": first_candidate_epoch,
        "inputs": tree_digest((params, batch_stats, opt_state))}))
    checkpoints = _open_checkpoints(run.checkpoint_dir, fingerprint)
    name = ("/".join(pathlib.Path(run.checkpoint_dir).parts[-2:]) if run.checkpoint_dir
            else str(identity).split("(")[0])  # for the progress lines
    state = PopulationState(
        epoch=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=opt_state,
        best_params=params, best_batch_stats=batch_stats,
        best_val_loss=jnp.full((size,), jnp.inf, jnp.float32),
        best_epoch=jnp.zeros((size,), jnp.int32), epochs_since_best=jnp.zeros((size,), jnp.int32),
        stopped=jnp.zeros((size,), bool))
    history: list[dict] = []
    scalars = ScalarWriter(run.log_dir)  # starts its directory afresh: the history is rewritten
    try:
        if checkpoints is not None and checkpoints.latest_epoch() is not None:
            state, history = checkpoints.restore(state)
            logging.info("%s: resuming after epoch %d from %s", identity, int(state.epoch),
                         checkpoints.directory)
        else:
            start = time.perf_counter()
            record = {"epoch": 0}
            if start_candidate:  # the incoming weights are a candidate: their score is epoch 0's
                loss, accuracy, criterion = validate(params, batch_stats)
                state = state.replace(best_val_loss=criterion.astype(jnp.float32))
                record.update(val_loss=np.asarray(loss).tolist(),
                              val_accuracy=np.asarray(accuracy).tolist())
            history.append({**record, "seconds": time.perf_counter() - start})
        for record in history:  # the event files of the epochs done before a resume, once
            scalars.write(record["epoch"], {k: np.asarray(record[k]) for k in SCALARS if k in record})
        # As the baseline's training: several steps per call, on one CPU all members in one
        # program, vmapped a few at a time (`train_chunking`).
        chunk, group = train_chunking(run.population_chunk, size)
        per_call = steps_per_call(steps)
        train_steps = make_train_steps(trainable, tx, dataset.mean, dataset.std, run.augment, chunk,
                                       per_call, group=group, loss=trainable.loss)
        images, labels = jnp.asarray(dataset.train.images), jnp.asarray(dataset.train.labels)
        data_keys, aug_keys, dropout_keys = (member_keys(seeds, s) for s in (DATA, AUGMENT, DROPOUT))
        while int(state.epoch) < epochs and not bool(state.stopped.all()):
            epoch = int(state.epoch) + 1
            start = time.perf_counter()
            order = epoch_order(data_keys, jnp.int32(epoch), len(dataset.train), steps, batch_size)
            p, b, o = state.params, state.batch_stats, state.opt_state
            losses = []
            for first_step in range(0, steps, per_call):
                p, b, o, loss, _ = train_steps(p, b, o, order, aug_keys, dropout_keys, images, labels,
                                               jnp.int32(epoch), jnp.int32(first_step))
                losses.append(loss)  # (members, per_call)
            losses = np.asarray(jnp.concatenate(losses, axis=1)).T  # (steps, members)
            if not np.all(np.isfinite(losses)):
                raise UserError(f"training loss became non-finite in epoch {epoch}: lower the learning"
                                f" rate ({learning_rate_note})")
            # Stopped members train on but their best weights are frozen (update_early_stopping).
            state = state.replace(params=p, batch_stats=b, opt_state=o)
            loss, accuracy, criterion = validate(p, b)
            if epoch >= first_candidate_epoch:
                state = update_early_stopping(state, criterion, jnp.int32(patience or epochs + 1))
            else:
                state = state.replace(epoch=state.epoch + 1)
            jax.block_until_ready(state)
            record = {"epoch": epoch, "seconds": time.perf_counter() - start,
                      "train_loss": losses.mean(0).tolist(), "val_loss": np.asarray(loss).tolist(),
                      "val_accuracy": np.asarray(accuracy).tolist()}
            history.append(record)
            logging.info("%s: epoch %d of %d, validation accuracy %.4f (mean of %d members), %.1f s",
                         name, epoch, epochs, float(np.mean(record["val_accuracy"])), size,
                         record["seconds"])
            if checkpoints is not None:
                checkpoints.save(state, history, fingerprint)
            scalars.write(epoch, {k: np.asarray(record[k]) for k in SCALARS})
    finally:
        scalars.close()
        if checkpoints is not None:
            checkpoints.close()
    seconds = sum(record["seconds"] for record in history)
    done = int(state.epoch)
    info = {"steps": done * steps, "epochs": done, "seconds": round(seconds, 3),
            "images_per_second": round(done * steps * batch_size * size / max(seconds, 1e-9), 1),
            "batch_size": batch_size, "learning_rate": learning_rate_note, "members": size,
            "best_epoch": np.asarray(state.best_epoch).tolist(),
            "select": select,
            "val_loss": [record["val_loss"] for record in history if record["epoch"] > 0],
            "val_accuracy": [record["val_accuracy"] for record in history if record["epoch"] > 0]}
    return Trained(state.best_params, state.best_batch_stats, state.opt_state, info)
