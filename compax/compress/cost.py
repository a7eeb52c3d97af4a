"""Inference cost of compressed models on this machine: images per second, measured side by side.

Zee et al. report the inference time of each compressed VGG-6. Here member 0 of every variant is
timed on the same batch of normalised test images: each jit-compiled forward pass runs once to
compile, then all of them run in turn, `rounds` times, so that a slow spell of a shared machine
hits every variant alike; the median time per batch gives images/s = batch / median seconds.
Unstructured pruning leaves dense tensors with zeros, which XLA computes like any others, so its
speed equals the dense model's within noise (the report says when a variant is no faster); a
structurally pruned model is a smaller dense one.
"""

import time

import jax
import numpy as np


def interleaved_seconds(calls: dict, rounds: int) -> dict[str, list[float]]:
    """{name: seconds of each round} of every `calls[name]()` (run once first, untimed), timed in
    `rounds` rounds that each run every call once, in order, so that a slow spell of a shared
    machine hits them alike."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


def images_per_second(models: dict, images, rounds: int = 7) -> dict[str, float]:
    """{name: images/s} of every `models[name] = (apply_fn, member)`, `apply_fn(member, images)`
    jitted, timed in interleaved rounds (module doc)."""
    def timed_call(fn, member):
        compiled = jax.jit(fn)
        return lambda: jax.block_until_ready(compiled(member, images))

    times = interleaved_seconds({name: timed_call(fn, member)
                                 for name, (fn, member) in models.items()}, rounds)
    return {name: float(images.shape[0] / np.median(t)) for name, t in times.items()}
