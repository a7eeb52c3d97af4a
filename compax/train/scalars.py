"""Per-epoch scalars of a population as TensorBoard event files (beside `metrics.jsonl`).

Every training loop (the baseline's `fit`, the recipe steps `gmp`, `finetune`, `qat`, `ablate`)
writes one directory of event files, a TensorBoard "run": the baseline `<workdir>/tensorboard/train`,
a recipe step `<workdir>/tensorboard/<variant>/<step>` (`tensorboard --logdir <workdir>/tensorboard`).
At step `epoch`, a metric with one value per member (e.g. `val_loss`) is written as
`member_<i>/val_loss` for every member with a finite value and `mean/val_loss`, the mean over those
(a stopped member's NaN is left out); a metric with one value (e.g. `seconds`) under its own name.

The files are written with tensorboardX, an event-file writer that needs neither TensorFlow nor
PyTorch (CLU's `metric_writers.SummaryWriter`, the flax examples' writer, imports TensorFlow).
A writer owns its directory: opening it deletes the event files already there, so a loop that
starts again writes its epochs afresh (`fit` rewrites those of its checkpoint first, as it rewrites
`metrics.jsonl`) and no epoch is logged twice. Each `write` is flushed to disk.
"""

import math
import pathlib
from collections.abc import Mapping

import numpy as np

EVENT_FILES = "events.out.tfevents.*"


class ScalarWriter:
    """Writes per-epoch scalars into the event files of `log_dir` (None: writes nothing)."""

    def __init__(self, log_dir: str | pathlib.Path | None):
        self.log_dir = None if log_dir is None else pathlib.Path(log_dir)
        self._writer = None
        if self.log_dir is None:
            return
        import tensorboardX  # imported here: only loops that log pay for it (protobuf)

        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob(EVENT_FILES):
            if old.is_file():
                old.unlink()
        self._writer = tensorboardX.SummaryWriter(str(self.log_dir), flush_secs=3600)

    def write(self, epoch: int, scalars: Mapping[str, object]) -> None:
        """Writes `scalars` ({name: value or one value per member}) at step `epoch` (module doc)."""
        if self._writer is None:
            return
        for name, value in scalars.items():
            values = np.asarray(value, np.float64)  # None (a stopped member) becomes NaN
            if values.ndim == 0:
                if math.isfinite(values):
                    self._writer.add_scalar(name, float(values), epoch)
                continue
            finite = np.isfinite(values)
            for i in np.flatnonzero(finite):
                self._writer.add_scalar(f"member_{i}/{name}", float(values[i]), epoch)
            if finite.any():
                self._writer.add_scalar(f"mean/{name}", float(values[finite].mean()), epoch)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "ScalarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

