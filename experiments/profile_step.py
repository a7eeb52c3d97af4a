"""Where compax's train step spends its time: XLA's own profile of a few steps, summed per op.

python experiments/profile_step.py --model=squeezenet --width=1.0 [--steps=5] [--top=25] [--batch_size=128]

Builds the train step that `bench_models.py` times (`bench_train.compax_runner`: one member,
Adam, batch `--batch_size`, random 32x32x3 images), warms it up, records `--steps` steps (5) with
`jax.profiler` (a Perfetto trace, written to a temporary folder) and prints, per step, the time of
every XLA op (thunk) and of the Python around it, largest first: `ffi_call.N` are compax's
convolution kernels (`compax/kernels`), `*_fusion*` XLA's fused elementwise ops, `$file:line` the
Python frames (inflated several times by the profiler's own tracing of Python calls). Ops run on
several threads overlap, so the column does not sum to the step's wall time, printed first.
"""

import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

# experiments/ is the script's directory; bench_train defines --batch_size and --steps.
from bench_train import _BATCH, _STEPS, compax_runner

flags.FLAGS.set_default("steps", 5)

_MODEL = flags.DEFINE_string("model", "squeezenet", "A model of compax.models.MODELS.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Its width multiplier.")
_TOP = flags.DEFINE_integer("top", 25, "Ops printed.")


def op_milliseconds(trace: dict, steps: int) -> list[tuple[str, float, float]]:
    """[(op, milliseconds per step, calls per step)] of a Perfetto trace's complete events."""
    total, calls = collections.Counter(), collections.Counter()
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    for event in events:
        if event.get("ph") == "X":
            total[event.get("name", "")] += event.get("dur", 0)
            calls[event.get("name", "")] += 1
    return [(name, micros / 1e3 / steps, calls[name] / steps) for name, micros in total.most_common()]


def main(argv):
    del argv
    import jax

    steps = _STEPS.value
    batch = _BATCH.value
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch * (steps + 3), 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, len(images)).astype(np.int32)
    mean, std = np.full(3, 127.5, np.float32), np.full(3, 64.0, np.float32)
    run = compax_runner(1, 1, images, labels, mean, std, batch, _MODEL.value, _WIDTH.value, 10)
    run(3)
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        started = time.perf_counter()
        run(steps)
        seconds = time.perf_counter() - started
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(next(pathlib.Path(folder).rglob("perfetto_trace.json.gz"))))
    print(f"{_MODEL.value} x{_WIDTH.value}, batch {batch}: {seconds / steps * 1e3:.1f} ms per step"
          f" under the profiler ({batch * steps / seconds:.0f} images/s)")
    ops = op_milliseconds(trace, steps)
    for name, ms, count in ops[:_TOP.value]:
        print(f"{ms:9.2f} ms  x{count:5.1f}  {name[:100]}")
    kinds = collections.Counter()
    for name, ms, _ in ops:
        if re.fullmatch(r"[a-z][\w.-]*", name):  # an HLO instruction, not a runtime frame
            kinds["fusion" if "fusion" in name else re.sub(r"\.\d+$", "", name)] += ms
    print("per kind of XLA op (ms per step):",
          ", ".join(f"{kind} {ms:.1f}" for kind, ms in kinds.most_common(12)))


if __name__ == "__main__":
    sys.exit(app.run(main))
