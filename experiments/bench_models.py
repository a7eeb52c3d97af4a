"""Training and inference throughput of every registered model, compax against PyTorch, in one run.

python experiments/bench_models.py [--models=lenet5,resnet18] [--widths=cpu,1.0] [--quick]
                                   [--batch_size=128] [--steps=10] [--repeats=3] [--classes=10]
                                   [--torch_threads=0]

For each model (`compax.models.MODELS`) at each width (`cpu`: its class's `cpu_size` width,
or a number) five runners are timed, interleaved round by round (`bench_train.
interleaved_seconds_per_step`), the fastest round counting: compax's train step (`make_train_step`:
Adam, cross-entropy, batch `batch_size`, the CPU convolution kernels of `compax.kernels`), the same
step with XLA's convolution in every layer, the same architecture written in PyTorch (NCHW,
PyTorch's default initialisation and Adam) training alike, and inference of a batch by compax
(`train=False`, the kernels on) and by PyTorch (eval mode, `torch.inference_mode`). Images are
random uint8 32x32x3, normalised inside each step. Each model's FLOPs per image (forward, from
XLA's cost analysis of the XLA-convolution forward; training ~3x: forward, input and weight
gradients) times images/s is printed as a fraction of this machine's float32 GEMM rate, measured
in the same run (the faster of `numpy.matmul` and `torch.mm` of two 2048x2048 matrices). The
last line is one JSON object: {"gemm_gflops": {"numpy", "torch", "best"}, "models": [{"model",
"width", "forward_gflop_per_image", "compax_train_img_s", "compax_xla_conv_train_img_s",
"torch_train_img_s", "ratio_train", "compax_infer_img_s", "torch_infer_img_s", "ratio_infer",
"<framework>_<train|infer>_gemm_fraction", ...}, ...]}.
"""

import json
import os
import pathlib
import platform
import sys
import time

import numpy as np
from absl import app, flags

# experiments/ is the script's directory. bench_train defines --batch_size (128), --steps and
# --repeats (3), used here too, with 10 steps per round by default.
from bench_train import (
    _BATCH,
    _REPEATS,
    _STEPS,
    compax_runner,
    interleaved_seconds_per_step,
    model_widths,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root
from torch_reference.runners import torch_runners  # noqa: E402

flags.FLAGS.set_default("steps", 10)
_MODELS = flags.DEFINE_list("models", None, "Models to time (default: every registered one).")
_WIDTHS = flags.DEFINE_list("widths", ["cpu", "1.0"],
                            "Widths: 'cpu' (the model's cpu_size width) or multipliers.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Output classes of every model.")
_QUICK = flags.DEFINE_bool("quick", False, "2 steps, 1 round: proves the script runs, times roughly.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "PyTorch's intra-op threads (0: its default, one per core). On a machine "
    "shared with other work, 1 avoids its OpenMP barriers waiting for preempted threads.")

GEMM_SIZE = 2048
# Both frameworks normalise the random images alike, (x / 255 - MEAN) / STD.
MEAN, STD = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)


def gemm_gflops(repeats: int) -> dict:
    """This machine's float32 matrix-multiply rate, 2 n^3 / the fastest n x n product's seconds,
    by numpy and by PyTorch (if installed; with the threads it is set to), and the best of them."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32) for _ in range(2))
    products = {"numpy": lambda: np.matmul(a, b)}
    try:
        import torch
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        products["torch"] = lambda: torch.mm(ta, tb)
    except ImportError:
        pass
    rates = {}
    for name, product in products.items():
        product()
        best = float("inf")
        for _ in range(max(3, repeats)):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * GEMM_SIZE**3 / best / 1e9
    return {**rates, "best": max(rates.values())}


def compax_runners(name: str, width: float, classes: int, images, labels, batch: int):
    """(train run(n), inference run(n)) of compax's model, each warmed up (compiled); with the
    kernels of `compax.kernels` as they are enabled when this is called. Training is
    `bench_train.compax_runner` with one member."""
    import jax
    import jax.numpy as jnp

    from compax.kernels import cpu_convolutions

    train = compax_runner(1, 1, images, labels, MEAN, STD, batch, name, width, classes)
    model = train.model
    variables = jax.tree.map(lambda a: a[0], train.variables())
    x = jnp.asarray((images[:batch].astype(np.float32) / 255 - MEAN) / STD)

    @jax.jit
    def predict(variables, x):
        with cpu_convolutions():
            return model.apply(variables, x, train=False)

    def infer(n):
        for _ in range(n):
            logits = predict(variables, x)
        jax.block_until_ready(logits)

    infer(2)
    return train, infer


def forward_flops(name: str, width: float, classes: int, batch: int) -> float:
    """FLOPs per image of the model's forward pass, by XLA's cost analysis (its convolutions)."""
    import jax
    import jax.numpy as jnp

    from compax.models import get_model, init_variables

    model = get_model(name, classes, width)
    variables = init_variables(model, jax.random.key(0))
    x = jnp.zeros((batch, 32, 32, 3), jnp.float32)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"] / batch


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def main(argv):
    del argv
    import jax

    from compax.kernels import conv_cpu, conv_onednn
    from compax.models import MODELS

    quick = _QUICK.value
    steps, repeats = (2, 1) if quick else (_STEPS.value, _REPEATS.value)
    batch, classes = _BATCH.value, _CLASSES.value
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4 * batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, 4 * batch).astype(np.int32)
    if _TORCH_THREADS.value > 0 and torch_version() is not None:
        import torch
        torch.set_num_threads(_TORCH_THREADS.value)  # global: the GEMM rate's and the twins'
    rates = gemm_gflops(repeats)
    gemm = rates["best"]
    print(f"float32 GEMM ({GEMM_SIZE}^3), GFLOP/s: "
          + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()))
    rows = []
    for name, width in model_widths(_MODELS.value or list(MODELS), _WIDTHS.value):
        data = (name, width, classes, images, labels, batch)
        conv_cpu.enable(False)  # XLA's convolution in every layer, for the functions traced now
        xla_train, _ = compax_runners(*data)
        flops = forward_flops(name, width, classes, batch)  # XLA counts its convolutions' FLOPs
        conv_cpu.enable(True)
        runners = dict(zip((("compax", "train"), ("compax", "infer")), compax_runners(*data),
                           strict=True))
        runners["compax_xla_conv", "train"] = xla_train
        twin = torch_runners(name, width, classes, images, labels, MEAN, STD, batch)
        if twin is not None:
            runners.update(zip((("torch", "train"), ("torch", "infer")), twin, strict=True))
        seconds = interleaved_seconds_per_step(runners, dict.fromkeys(runners, steps), repeats)
        row = {"model": name, "width": width, "forward_gflop_per_image": flops / 1e9}
        row.update({f"{framework}_{kind}_img_s": batch / step_seconds
                    for (framework, kind), step_seconds in seconds.items()})
        # Training FLOPs ~3x the forward's: the forward, the input and the weight gradients.
        for kind, factor in (("train", 3), ("infer", 1)):
            torch_rate = row.get(f"torch_{kind}_img_s")
            row[f"ratio_{kind}"] = None if torch_rate is None else row[f"compax_{kind}_img_s"] / torch_rate
            for framework in ("compax", "torch"):
                rate = row.get(f"{framework}_{kind}_img_s")
                row[f"{framework}_{kind}_gemm_fraction"] = (
                    None if rate is None else factor * flops * rate / (gemm * 1e9))
        rows.append(row)
        print(f"{name} x{width:g} ({flops / 1e6:.1f} MFLOP/image forward)"
              + (":" if twin is not None else ", compax only (no torch, or no twin of the model in "
                 "torch_reference/models.py):"))
        print(f"  train  compax {row['compax_train_img_s']:8.0f} img/s"
              f" (XLA conv {row['compax_xla_conv_train_img_s']:8.0f})"
              + ("" if twin is None else f"  PyTorch {row['torch_train_img_s']:8.0f}"
                 f"  compax/PyTorch {row['ratio_train']:.2f}")
              + f"  GEMM fraction compax {row['compax_train_gemm_fraction']:.3f}"
              + ("" if twin is None else f" PyTorch {row['torch_train_gemm_fraction']:.3f}"))
        print(f"  infer  compax {row['compax_infer_img_s']:8.0f} img/s"
              + ("" if twin is None else f"  PyTorch {row['torch_infer_img_s']:8.0f}"
                 f"  compax/PyTorch {row['ratio_infer']:.2f}")
              + f"  GEMM fraction compax {row['compax_infer_gemm_fraction']:.3f}"
              + ("" if twin is None else f" PyTorch {row['torch_infer_gemm_fraction']:.3f}"), flush=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "jax_backend": jax.default_backend(),
        "onednn": conv_onednn.enabled() and conv_onednn.load(),
        "torch": torch_version(),
        "torch_threads": _TORCH_THREADS.value or None,
        "batch_size": batch, "steps": steps, "repeats": repeats, "quick": quick,
        "gemm_gflops": rates,
        "models": rows,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
