"""Population training throughput: one vmapped program over all members against a loop over members.

python experiments/bench_population.py [--sizes=1,4,16,32] [--batch_size=128] [--steps=10] [--quick]

For each population size, LeNet-5 (43 classes; on an accelerator also ResNet-18) trains with Adam
on random 32x32x3 images, and three ways of running a train step of the whole population are
timed, best of `repeats` after a warm-up (compilation) call, in members x images per second:
  vmap     one jit(vmap) over all members (population_chunk = size), split over every device;
  chunked  population_chunk = 0, the automatic chunk (one member per device on the CPU, all
           members on accelerators unless they do not fit in memory);
  loop     a Python loop over the members, each calling a single-member jit-compiled step.
The last line is one JSON object: speedup_vmap_vs_loop (LeNet-5) per population size, the
device, and every measurement per model.
"""

import json
import platform
import time

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["1", "4", "16", "32"], "Population sizes.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per step and member.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats; the fastest counts.")
_MODELS = flags.DEFINE_list("models", [], "Models; default lenet5, plus resnet18 on accelerators.")
_QUICK = flags.DEFINE_boolean("quick", False, "A quick check: sizes 1,2,4, batch 32, 2 steps, 1 repeat.")


def best_seconds(run_steps, steps: int, repeats: int) -> float:
    """Seconds for `steps` steps, fastest of `repeats` timings (after two warm-up steps: the
    second compiles again for inputs that the first placed on the devices)."""
    run_steps(2)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_steps(steps)
        timings.append(time.perf_counter() - start)
    return min(timings)


def population_rates(model_name: str, size: int, batch: int, steps: int, repeats: int) -> dict:
    """Members x images per second of the three ways (vmap, chunked, loop) for `size` members."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from compax.models import get_model
    from compax.population import population_chunk, take_members
    from compax.train import init_population, make_optimizer
    from compax.train.population import AUGMENT, DATA, DROPOUT, member_keys
    from compax.train.steps import epoch_order, make_train_step

    num_classes, num_steps = 43, 4
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (num_steps * batch, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, num_classes, num_steps * batch, dtype=np.int32))
    mean, std = np.full(3, 127.5, np.float32), np.full(3, 73.9, np.float32)
    model = get_model(model_name, num_classes)
    tx = make_optimizer(ml_collections.ConfigDict({"learning_rate": 1e-3}))
    seeds = jnp.arange(size)
    initial = init_population(model, tx, seeds)
    order = epoch_order(member_keys(seeds, DATA), jnp.int32(1), len(images), num_steps, batch)
    keys = member_keys(seeds, AUGMENT), member_keys(seeds, DROPOUT)

    def stepper(step_fn, populations):
        """`run(n)`: n train steps, each calling `step_fn` once per population in `populations`
        (index arrays of members); the states carry over from call to call."""
        states = [take_members((initial.params, initial.batch_stats, initial.opt_state, order,
                                *keys), members) for members in populations]

        def run(n):
            for i in range(n):
                for j, state in enumerate(states):
                    *trained, loss, _ = step_fn(*state, images, labels, jnp.int32(1),
                                                jnp.int32(i % num_steps))
                    states[j] = (*trained, *state[3:])
            jax.block_until_ready(loss)
        return run

    everyone = [np.arange(size)]
    vmap_step = make_train_step(model, tx, mean, std, False, size)
    seconds = {"vmap": best_seconds(stepper(vmap_step, everyone), steps, repeats)}
    chunk = population_chunk(0, size)
    if chunk == size:
        seconds["chunked"] = seconds["vmap"]
    else:
        chunked_step = make_train_step(model, tx, mean, std, False, chunk)
        seconds["chunked"] = best_seconds(stepper(chunked_step, everyone), steps, repeats)
    single_step = make_train_step(model, tx, mean, std, False, 1)  # jit of a vmap over 1 member
    one_by_one = [np.array([i]) for i in range(size)]
    seconds["loop"] = best_seconds(stepper(single_step, one_by_one), steps, repeats)
    rates = {way: size * batch * steps / s for way, s in seconds.items()}
    return {**{f"{way}_img_s": rate for way, rate in rates.items()}, "chunk": chunk,
            "speedup_vmap_vs_loop": rates["vmap"] / rates["loop"],
            "speedup_chunked_vs_loop": rates["chunked"] / rates["loop"]}


def main(argv):
    del argv
    import jax

    sizes = [1, 2, 4] if _QUICK.value else [int(s) for s in _SIZES.value]
    batch, steps, repeats = ((32, 2, 1) if _QUICK.value
                             else (_BATCH.value, _STEPS.value, _REPEATS.value))
    backend = jax.default_backend()
    models = _MODELS.value or (["lenet5"] + ([] if backend == "cpu" else ["resnet18"]))
    by_model = {}
    print(f"{'model':9} {'members':>7} {'chunk':>5} {'vmap':>10} {'chunked':>10} {'loop':>10}"
          f" {'vmap/loop':>9}   (members x images / s)")
    for model in models:
        by_model[model] = {}
        for size in sizes:
            r = population_rates(model, size, batch, steps, repeats)
            by_model[model][str(size)] = r
            print(f"{model:9} {size:7d} {r['chunk']:5d} {r['vmap_img_s']:10.0f}"
                  f" {r['chunked_img_s']:10.0f} {r['loop_img_s']:10.0f}"
                  f" {r['speedup_vmap_vs_loop']:9.2f}", flush=True)
    first = models[0]
    result = {
        "speedup_vmap_vs_loop": {s: r["speedup_vmap_vs_loop"] for s, r in by_model[first].items()},
        "model": first,
        "backend": backend,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "machine": platform.processor() or platform.machine(),
        "batch_size": batch,
        "steps": steps,
        "by_model": by_model,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
