"""Population training throughput: one program over all members against a loop over members and
against PyTorch's single model, in one run.

python experiments/bench_population.py [--sizes=1,4,16,32] [--batch_size=128] [--steps=10] [--quick]

For each population size, LeNet-5 (43 classes; on an accelerator also ResNet-18) trains with Adam
on random 32x32x3 images, and these ways of running `steps` train steps of the whole population
are timed, in members x images per second, best of `repeats` rounds after a warm-up (compilation)
round; each round times every way once, one after the other, so that a slow spell of a loaded
machine hits all of them:
  vmap   one jit(vmap) over all members per step (population_chunk = size), over every device;
  auto   what `fit` runs by default: `train_chunking(0, size)` (on one CPU the whole population in
         one program, vmapped `CPU_MEMBER_GROUP` members at a time; on accelerators all members
         unless they do not fit in memory) and `steps_per_call(steps)` steps per call;
  loop   a Python loop over the members, each calling a single-member jit-compiled step;
  torch  PyTorch's twin of the model (torch_reference/runners.py), one model (images/s), if installed:
         the faster of one thread and one per core (torch_1, torch_all), as OpenMP's spinning
         threads on a loaded machine can make PyTorch's default 30x slower.
The last line is one JSON object: speedup_vmap_vs_loop, speedup_auto_vs_loop (LeNet-5) and
speedup_vmap_vs_torch, speedup_auto_vs_torch per population size, the device, and every
measurement per model.
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

_SIZES = flags.DEFINE_list("sizes", ["1", "4", "16", "32"], "Population sizes.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per step and member.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Rounds over all ways; the fastest counts.")
_MODELS = flags.DEFINE_list("models", [], "Models; default lenet5, plus resnet18 on accelerators.")
_QUICK = flags.DEFINE_boolean("quick", False, "A quick check: sizes 1,2,4, batch 32, 2 steps, 1 repeat.")


def best_seconds(runners: dict, steps: int, repeats: int) -> dict:
    """Seconds for `steps` steps of each runner, fastest of `repeats` rounds, after a warm-up
    round (it compiles, and compiles again for inputs that the first call placed on the devices);
    each round runs every runner in turn. `runners[name](n)` runs n steps and waits for them."""
    for run_steps in runners.values():
        run_steps(steps)
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for name, run_steps in runners.items():
            start = time.perf_counter()
            run_steps(steps)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def population_rates(model_name: str, size: int, batch: int, steps: int, repeats: int) -> dict:
    """Members x images per second of the ways (vmap, auto, loop; torch: one model) for `size`
    members."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from compax.member_vmap import take_members, train_chunking
    from compax.models import get_model
    from compax.train import init_population, make_optimizer
    from compax.train.population import AUGMENT, DATA, DROPOUT, member_keys
    from compax.train.steps import epoch_order, make_train_step, make_train_steps, steps_per_call

    num_classes = 43
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (steps * batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, steps * batch, dtype=np.int32)
    mean, std = np.full(3, 127.5, np.float32), np.full(3, 73.9, np.float32)
    model = get_model(model_name, num_classes)
    tx = make_optimizer(ml_collections.ConfigDict({"learning_rate": 1e-3}))
    seeds = jnp.arange(size)
    initial = init_population(model, tx, seeds)
    order = epoch_order(member_keys(seeds, DATA), jnp.int32(1), len(images), steps, batch)
    keys = member_keys(seeds, AUGMENT), member_keys(seeds, DROPOUT)
    shared = jnp.asarray(images), jnp.asarray(labels), jnp.int32(1)

    def stepper(step_fn, populations, per_call=1):
        """`run(n)`: n train steps, `per_call` at a time, calling `step_fn` once per population
        in `populations` (index arrays of members); the states carry over from call to call."""
        states = [take_members((initial.params, initial.batch_stats, initial.opt_state, order,
                                *keys), members) for members in populations]

        def run(n):
            for first_step in range(0, n, per_call):
                for j, state in enumerate(states):
                    *trained, loss, _ = step_fn(*state, *shared, jnp.int32(first_step))
                    states[j] = (*trained, *state[3:])
            jax.block_until_ready(loss)
        return run

    everyone = [np.arange(size)]
    chunk, group = train_chunking(0, size)
    per_call = steps_per_call(steps)
    runners = {
        "vmap": stepper(make_train_step(model, tx, mean, std, False, size), everyone),
        "auto": stepper(make_train_steps(model, tx, mean, std, False, chunk, per_call, group=group),
                        everyone, per_call),
        # a jit of a vmap over 1 member, per member
        "loop": stepper(make_train_step(model, tx, mean, std, False, 1),
                        [np.array([i]) for i in range(size)]),
    }
    for name, threads in (("torch_1", 1), ("torch_all", os.cpu_count())):
        twin = torch_runners(model_name, 1.0, num_classes, images, labels, mean, std, batch, threads)
        if twin is not None:
            runners[name] = twin[0]
    seconds = best_seconds(runners, steps, repeats)
    rates = {way: (1 if way.startswith("torch") else size) * batch * steps / s
             for way, s in seconds.items()}
    if "torch_1" in rates:
        rates["torch"] = max(rates["torch_1"], rates["torch_all"])
    result = {**{f"{way}_img_s": rate for way, rate in rates.items()}, "chunk": chunk,
              "group": group, "steps_per_call": per_call}
    for way in ("vmap", "auto"):
        result[f"speedup_{way}_vs_loop"] = rates[way] / rates["loop"]
        result[f"speedup_{way}_vs_torch"] = rates[way] / rates["torch"] if "torch" in rates else None
    return result


def main(argv):
    del argv
    import jax

    sizes = [1, 2, 4] if _QUICK.value else [int(s) for s in _SIZES.value]
    batch, steps, repeats = ((32, 2, 1) if _QUICK.value
                             else (_BATCH.value, _STEPS.value, _REPEATS.value))
    backend = jax.default_backend()
    models = _MODELS.value or (["lenet5"] + ([] if backend == "cpu" else ["resnet18"]))
    by_model = {}
    print(f"{'model':9} {'members':>7} {'chunk':>5} {'group':>5} {'vmap':>8} {'auto':>8}"
          f" {'loop':>8} {'torch':>8} {'vmap/loop':>9} {'auto/loop':>9} {'vmap/torch':>10}"
          f" {'auto/torch':>10}   (members x images / s)")
    for model in models:
        by_model[model] = {}
        for size in sizes:
            r = population_rates(model, size, batch, steps, repeats)
            by_model[model][str(size)] = r
            torch_rate, ratios = r.get("torch_img_s"), []
            for key in ("speedup_vmap_vs_loop", "speedup_auto_vs_loop", "speedup_vmap_vs_torch",
                        "speedup_auto_vs_torch"):
                ratios.append("-" if r[key] is None else f"{r[key]:.2f}")
            print(f"{model:9} {size:7d} {r['chunk']:5d} {r['group']:5d} {r['vmap_img_s']:8.0f}"
                  f" {r['auto_img_s']:8.0f} {r['loop_img_s']:8.0f}"
                  f" {'-' if torch_rate is None else f'{torch_rate:.0f}':>8} {ratios[0]:>9}"
                  f" {ratios[1]:>9} {ratios[2]:>10} {ratios[3]:>10}", flush=True)
    first = by_model[models[0]]
    result = {
        **{key: {s: r[key] for s, r in first.items()}
           for key in ("speedup_vmap_vs_loop", "speedup_auto_vs_loop", "speedup_vmap_vs_torch",
                       "speedup_auto_vs_torch")},
        "model": models[0],
        "backend": backend,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "batch_size": batch,
        "steps": steps,
        "by_model": by_model,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
