"""Per-epoch orbax checkpoints of a population's training state, verified by checksums, and
resumption from the last.

A checkpoint `checkpoints/<epoch>/` is orbax's folder plus `compax_manifest.json`, written (atomically)
after orbax has committed the folder:

    {"epoch", "sha256": {file: SHA-256 of every file of the folder},
     "history": the metrics of epochs 1..epoch (the lines of metrics.jsonl),
     "config": the config the population was trained with}

The manifest is what makes a checkpoint finished: one without it (a run killed between orbax's
commit and the manifest) is removed, and training resumes from the checkpoint before. The
metrics of an epoch are in its checkpoint, so the two become durable together and
`metrics.jsonl` is rebuilt from the checkpoint on resume. Restoring first checks every file
against the manifest; a mismatch is a UserError naming the file and the way back (delete that
checkpoint: training resumes from the one before).
"""

import math
import pathlib

import jax
import orbax.checkpoint as ocp
from absl import logging

from compax.distributed import is_main_process
from compax.errors import UserError
from compax.safe_files import (
    MANIFEST,
    check_free_space,
    read_json,
    tree_checksums,
    verify_checksums,
    write_json_atomic,
)
from compax.train.population import PopulationState

METRIC_LISTS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def state_bytes(tree) -> int:
    """Bytes of the arrays of `tree` (the global arrays, over all devices and hosts)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


class PopulationCheckpoints:
    """The checkpoints of one training run in `directory`; keeps the newest `keep`."""

    def __init__(self, directory: pathlib.Path, keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        for epoch in self._manager.all_steps():
            if not (self.step_dir(epoch) / MANIFEST).is_file():
                logging.warning("checkpoint %s has no %s (its save was interrupted): removed",
                                self.step_dir(epoch), MANIFEST)
                self._manager.delete(epoch)

    def step_dir(self, epoch: int) -> pathlib.Path:
        return self.directory / str(epoch)

    def latest_epoch(self) -> int | None:
        """The epoch of the newest finished checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, state: PopulationState, history: list[dict], config: dict) -> None:
        """Writes `state` as the checkpoint of its epoch with the metric `history` up to it and
        the training `config` (blocks until it is on disk)."""
        epoch = int(state.epoch)
        check_free_space(self.directory, int(1.1 * state_bytes(state)) + 2**20,
                         f"the checkpoint of epoch {epoch}")
        self._manager.save(epoch, args=ocp.args.StandardSave(state))
        self._manager.wait_until_finished()
        if is_main_process():
            step = self.step_dir(epoch)
            write_json_atomic(step / MANIFEST, {
                "epoch": epoch, "sha256": tree_checksums(step, skip=(MANIFEST,)),
                "history": [_as_json(h) for h in history], "config": config})

    def manifest(self, epoch: int) -> dict:
        """The manifest of the checkpoint of `epoch`."""
        path = self.step_dir(epoch) / MANIFEST
        manifest = read_json(path, "checkpoint manifest", self._fix(epoch))
        if not isinstance(manifest, dict) or not {"sha256", "history"} <= manifest.keys():
            raise UserError(f"checkpoint manifest {path} lacks its checksums or metrics:"
                            f" {self._fix(epoch)}")
        return manifest

    def restore(self, like: PopulationState) -> tuple[PopulationState, list[dict]]:
        """The newest checkpoint, shaped like `like` (a freshly initialised state), after checking
        its files against their checksums; and the metric history up to its epoch."""
        epoch = self.latest_epoch()
        manifest = self.manifest(epoch)
        verify_checksums(self.step_dir(epoch), manifest["sha256"], f"checkpoint of epoch {epoch}",
                         self._fix(epoch))
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        try:
            state = self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types for unreadable or mismatched files.
            raise UserError(f"checkpoint {self.step_dir(epoch)} cannot be restored"
                            f" ({type(e).__name__}): {self._fix(epoch)}") from None
        return state, [_from_json(h) for h in manifest["history"]]

    def _fix(self, epoch: int) -> str:
        before = [e for e in self._manager.all_steps() if e < epoch]
        resume = f"resume from epoch {max(before)}" if before else "train again from the start"
        return f"delete the folder {self.step_dir(epoch)} to {resume}, or use a new --workdir"

    def close(self) -> None:
        self._manager.close()


def _as_json(record: dict) -> dict:
    """A metrics record with NaN (members that have stopped) as None, which JSON can hold."""
    return {k: [None if isinstance(x, float) and math.isnan(x) else x for x in v]
            if k in METRIC_LISTS else v for k, v in record.items()}


def _from_json(record: dict) -> dict:
    """The inverse of `_as_json`: the record as the training loop made it."""
    return {k: [math.nan if x is None else x for x in v] if k in METRIC_LISTS else v
            for k, v in record.items()}


def recorded_config(directory: pathlib.Path) -> dict | None:
    """The config of the newest finished checkpoint in `directory`, or None (no checkpoint)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return None
    epochs = sorted((int(p.name) for p in directory.iterdir()
                     if p.name.isdigit() and (p / MANIFEST).is_file()), reverse=True)
    if not epochs:
        return None
    path = directory / str(epochs[0]) / MANIFEST
    manifest = read_json(path, "checkpoint manifest", f"delete the folder {path.parent} to resume"
                         " from the checkpoint before, or use a new --workdir")
    return manifest.get("config") if isinstance(manifest, dict) else None
