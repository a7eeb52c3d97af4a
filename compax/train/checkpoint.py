"""Per-epoch orbax checkpoints of a population's training state, and resumption from the last."""

import pathlib

import jax
import orbax.checkpoint as ocp

from compax.errors import UserError
from compax.train.population import PopulationState


class PopulationCheckpoints:
    """The checkpoints of one training run in `directory`; keeps the newest `keep`."""

    def __init__(self, directory: pathlib.Path, keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_epoch(self) -> int | None:
        """The epoch of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, state: PopulationState) -> None:
        """Writes `state` as the checkpoint of its epoch (blocks until it is on disk)."""
        self._manager.save(int(state.epoch), args=ocp.args.StandardSave(state))
        self._manager.wait_until_finished()

    def restore(self, like: PopulationState) -> PopulationState:
        """The newest checkpoint, shaped like `like` (a freshly initialised state)."""
        epoch = self.latest_epoch()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        try:
            return self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types for unreadable or mismatched files.
            raise UserError(
                f"checkpoint {self.directory / str(epoch)} cannot be restored ({type(e).__name__}:"
                f" {str(e).splitlines()[0][:200]}): delete that folder to resume from the one"
                " before, or use a new --workdir") from e

    def close(self) -> None:
        self._manager.close()
