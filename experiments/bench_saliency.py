"""Saliency maps of the whole GTSRB test set: compax per variant against PyTorch on the float model.

python experiments/bench_saliency.py [--workdir=runs/gtsrb_lenet] [--batch_size=256] [--repeats=2]

Times `compax.measure.saliency_maps` (|d y_t / d x|, max over colour channels, normalised per
image; Simonyan et al. 2014, as Schwaiger et al. 2022 use it) for every image of the test set and
the study's variants float32, pruned, w8a8, w4a8 and pruned_w8a8 of one LeNet-5 (member 0 of a
finished `launch.py` run given by --workdir, else a freshly initialised one; the timing does not
depend on the weights), each jit-compiled once and timed after a warm-up call, fastest of
`repeats`. The quantized variants differentiate through the fake-quant straight-through estimator.
PyTorch (when installed) computes the same maps of the float model with autograd, batch by batch,
and the two float maps are compared (largest difference; images differing by over 1e-3, where
maxima that tie up to rounding are resolved differently). Pruned variants use the run's pruning
level (else 0.5). The last line is one JSON object: seconds and images/s per variant,
torch_float_s (null without torch) and ratio_compax_vs_torch_float (compax images/s over PyTorch's).
"""

import functools
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from compax.compress.prune import global_l1_masks
from compax.compress_population import calibration_images
from compax.config import base_config
from compax.data import load_dataset, normalize
from compax.measure.saliency import saliency_maps
from compax.member_vmap import take_members
from compax.models import get_model
from compax.one_model import compress
from compax.train import fit

# The PyTorch reference models live with the tests (test-only code, outside the package).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from torch_reference.models import torch_twin  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a finished LeNet-5 GTSRB run (optional).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per saliency batch (compax and PyTorch).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats; the fastest counts.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Use only the first N test images (0: all).")

VARIANTS = ("float32", "pruned", "w8a8", "w4a8", "pruned_w8a8")


def fastest(fn, repeats: int) -> tuple[float, object]:
    """Seconds of the fastest of `repeats` calls of fn() (blocked until ready), and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, result


def lenet_and_level(dataset):
    """(config, model, variables, pruning level) of --workdir's member 0, or a fresh LeNet-5."""
    if _WORKDIR.value is None:
        config = base_config()
        model = get_model("lenet5", dataset.num_classes)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        return config, model, variables, 0.5
    workdir = pathlib.Path(_WORKDIR.value)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    trained = fit(config, dataset, workdir, progress=False)  # restores the finished run
    results = json.loads((workdir / "results.json").read_text())
    level = results["sparsity_search"]["chosen"]
    return config, trained.model, jax.device_get(take_members(trained.variables, 0)), level


def torch_saliency(model, params, images: np.ndarray, targets: np.ndarray, batch: int) -> np.ndarray:
    """The same maps from PyTorch autograd on the float LeNet-5 holding `params`."""
    import torch

    net = torch_twin(model, params)
    maps = []
    for start in range(0, len(images), batch):
        x = torch.tensor(images[start:start + batch].transpose(0, 3, 1, 2), requires_grad=True)
        logits = net(x)
        target = torch.from_numpy(targets[start:start + batch].astype(np.int64))[:, None]
        logits.gather(1, target).sum().backward()
        grad = x.grad.abs().amax(dim=1)
        peak = grad.amax(dim=(1, 2), keepdim=True)
        maps.append((grad / torch.where(peak > 0, peak, torch.ones_like(peak))).numpy())
    return np.concatenate(maps)


def main(argv):
    del argv
    dataset = load_dataset("gtsrb")
    config, model, variables, level = lenet_and_level(dataset)
    count = _LIMIT.value or len(dataset.test.labels)
    images = normalize(dataset.test.images[:count], dataset.mean, dataset.std)
    targets = np.asarray(dataset.test.labels[:count], np.int32)
    calib = calibration_images(config, dataset)
    masks = global_l1_masks(variables["params"], level)
    run = jax.jit(saliency_maps, static_argnums=(0, 4))
    x, t = jnp.asarray(images), jnp.asarray(targets)
    result = {"images": count, "batch_size": _BATCH.value, "pruning_level": level,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "jax_backend": jax.default_backend(), "seconds": {}, "img_s": {}}
    float_maps = None
    for variant in VARIANTS:
        compressed = compress(variant, model, variables, calib,
                              masks if variant.startswith("pruned") else None)
        maps_of_test_set = functools.partial(run, model, compressed, x, t, _BATCH.value)
        compile_s, _ = fastest(maps_of_test_set, 1)  # compile + warm-up
        seconds, maps = fastest(maps_of_test_set, _REPEATS.value)
        float_maps = np.asarray(maps) if variant == "float32" else float_maps
        result["seconds"][variant], result["img_s"][variant] = seconds, count / seconds
        print(f"compax {variant:12s} {seconds:7.2f} s  {count / seconds:8.0f} images/s"
              f"  (first call {compile_s:.1f} s)", flush=True)
    try:
        import torch
    except ImportError:
        torch = None
    result["torch_float_s"] = result["ratio_compax_vs_torch_float"] = None
    if torch is not None:
        torch_s, torch_maps = fastest(lambda: torch_saliency(
            model, variables["params"], images, targets, _BATCH.value), _REPEATS.value)
        result["torch_float_s"] = torch_s
        result["torch_threads"] = torch.get_num_threads()
        result["ratio_compax_vs_torch_float"] = torch_s / result["seconds"]["float32"]
        difference = np.abs(torch_maps - float_maps).reshape(count, -1).max(axis=1)
        result["max_abs_map_difference"] = float(difference.max())
        result["images_differing_over_1e-3"] = int(np.sum(difference > 1e-3))
        print(f"PyTorch {torch.__version__} float {torch_s:7.2f} s  {count / torch_s:8.0f} images/s"
              f"  (compax / PyTorch = {result['ratio_compax_vs_torch_float']:.2f}; largest map"
              f" difference {result['max_abs_map_difference']:.1e}, over 1e-3 in"
              f" {result['images_differing_over_1e-3']} images)")
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
