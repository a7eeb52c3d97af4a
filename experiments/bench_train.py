"""LeNet-5 training throughput: compax (one model, a population of 8) against PyTorch, in one run.

python experiments/bench_train.py [--batch_size=128] [--steps=60]

Every variant trains the study's LeNet-5 (43 classes) with Adam and cross-entropy on batches of
GTSRB training images (uint8 on the device, normalised inside the step), timed over `steps`
steps after warm-up, best of `repeats` rounds that time every variant in turn; on the CPU compax
trains with its direct convolution kernels (compax/kernels), and the single model is also timed
with XLA's convolution. The last line is one JSON object: compax_img_s, compax_xla_conv_img_s,
compax_pop8_img_model_s, torch_img_s (null without torch), ratio_compax_vs_torch, ...
"""

import json
import os
import pathlib
import platform
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root
from torch_reference.runners import torch_runners  # noqa: E402

_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per step and model.")
_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Rounds over all variants; the fastest counts.")


def training_images(num: int):
    """GTSRB training images and labels when the offline copy exists, else synthetic_signs."""
    from compax.data import load_dataset
    from compax.errors import UserError
    try:
        data = load_dataset("gtsrb")
    except UserError:
        data = load_dataset("synthetic_signs")
    return data.train.images[:num], data.train.labels[:num], data.mean, data.std, data.name


def interleaved_seconds_per_step(runners: dict, steps: dict, repeats: int) -> dict:
    """Seconds per step of each runner, the fastest of `repeats` rounds; each round times every
    runner once, one after the other, so that a slow spell of the machine hits all of them.
    `runners[name](n)` runs n steps and waits for them; each was warmed up (compiled) before."""
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for name, run_steps in runners.items():
            best[name] = min(best[name], _timed(run_steps, steps[name]) / steps[name])
    return best


def model_widths(models, widths) -> list[tuple[str, float]]:
    """(model, width) pairs of `--models` and `--widths` (`cpu`: the model's `cpu_size` width),
    without repeats; an unknown model is a usage error."""
    from compax.models import MODELS, cpu_size

    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise app.UsageError(f"unknown models {unknown}: choose from {', '.join(sorted(MODELS))}")
    pairs = []
    for name in models:
        for width in widths:
            value = cpu_size(name)[0] if width == "cpu" else float(width)
            if (name, value) not in pairs:
                pairs.append((name, value))
    return pairs


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def compax_runner(population: int, chunk: int, images, labels, mean, std, batch: int,
                  model_name: str = "lenet5", width: float = 1.0, classes: int = 43):
    """`run(n)`: n compax train steps of `population` members of `model_name` (at `width`, with
    `classes` outputs), `chunk` of them vmapped together (0: automatic), compiled (by a warm-up
    call) before it is returned; `run.model` is the model and `run.variables()` the members'
    variables as they are now."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from compax.member_vmap import population_chunk
    from compax.models import get_model
    from compax.train import init_population, make_optimizer
    from compax.train.population import AUGMENT, DATA, DROPOUT, member_keys, variables_of
    from compax.train.steps import epoch_order, make_train_step

    model = get_model(model_name, classes, width)
    tx = make_optimizer(ml_collections.ConfigDict({"learning_rate": 1e-3}))
    seeds = jnp.arange(population)
    state = init_population(model, tx, seeds)
    step_fn = make_train_step(model, tx, mean, std, augment=False,
                              chunk=population_chunk(chunk, population))
    num_steps = len(images) // batch
    order = epoch_order(member_keys(seeds, DATA), jnp.int32(1), len(images), num_steps, batch)
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    keys = member_keys(seeds, AUGMENT), member_keys(seeds, DROPOUT)

    def run(n):
        nonlocal state
        for i in range(n):
            params, batch_stats, opt_state, loss, _ = step_fn(
                state.params, state.batch_stats, state.opt_state, order, *keys,
                images, labels, jnp.int32(1), jnp.int32(i % num_steps))
            state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
        jax.block_until_ready(loss)

    run(2)
    run.model = model
    run.variables = lambda: variables_of(state.params, state.batch_stats)  # the current members
    return run


def main(argv):
    del argv
    import jax

    batch, steps, repeats = _BATCH.value, _STEPS.value, _REPEATS.value
    images, labels, mean, std, data_name = training_images(20 * batch)
    data = (images, labels, mean, std, batch)
    from compax.kernels import conv_cpu
    pop_steps = max(3, steps // 8)  # as many images per model-step as the single model
    conv_cpu.enable(False)  # the same step with XLA's convolution in every layer (traced now)
    runners = {"single_xla_conv": compax_runner(1, 0, *data)}
    conv_cpu.enable(True)
    runners.update(single=compax_runner(1, 0, *data), pop8=compax_runner(8, 0, *data),
                   pop8_one_vmap=compax_runner(8, 8, *data))
    twin = torch_runners("lenet5", 1.0, 43, *data)
    if twin is not None:
        runners["torch"] = twin[0]
    seconds = interleaved_seconds_per_step(
        runners, {name: pop_steps if name.startswith("pop8") else steps for name in runners},
        repeats)
    single, single_xla_conv = seconds["single"], seconds["single_xla_conv"]
    pop8, pop8_one_vmap, torch_step = seconds["pop8"], seconds["pop8_one_vmap"], seconds.get("torch")
    result = {
        "data": data_name,
        "batch_size": batch,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "jax_backend": jax.default_backend(),
        "compax_img_s": batch / single,
        "compax_xla_conv_img_s": batch / single_xla_conv,
        "cpu_conv_kernels": conv_cpu.load() and jax.default_backend() == "cpu",
        "compax_pop8_img_model_s": 8 * batch / pop8,
        "compax_pop8_one_vmap_img_model_s": 8 * batch / pop8_one_vmap,
        "torch_img_s": None if torch_step is None else batch / torch_step,
    }
    result["ratio_compax_vs_torch"] = (None if torch_step is None
                                       else result["compax_img_s"] / result["torch_img_s"])
    result["ratio_pop8_vs_single"] = result["compax_pop8_img_model_s"] / result["compax_img_s"]
    print(f"compax, one model:        {result['compax_img_s']:9.0f} images/s")
    print(f"  with XLA's convolution:  {result['compax_xla_conv_img_s']:9.0f} images/s")
    print(f"compax, population of 8:  {result['compax_pop8_img_model_s']:9.0f} images x models/s"
          f"  ({result['ratio_pop8_vs_single']:.2f}x one model)")
    print(f"  the 8 in one vmap:       {result['compax_pop8_one_vmap_img_model_s']:9.0f} images x models/s")
    if torch_step is not None:
        print(f"PyTorch {__import__('torch').__version__}:            {result['torch_img_s']:9.0f}"
              f" images/s  (compax / PyTorch = {result['ratio_compax_vs_torch']:.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
