"""Inference cost of a compressed model on this machine: images per second, measured.

Zee et al. report the inference time of each compressed VGG-6. Here one member is timed on a fixed
batch of normalised test images: the jit-compiled forward pass runs once to compile, then
`repeats` times; the median time per batch gives images/s = batch / median seconds. Unstructured
pruning leaves dense tensors with zeros, which XLA computes like any others, so its speed equals
the dense model's (the results say so); a structurally pruned model is a smaller dense one.
"""

import time

import jax
import numpy as np


def images_per_second(apply_fn, member, images, repeats: int = 5) -> float:
    """Images/s of `apply_fn(member, images)` (jitted), the median over `repeats` timed calls."""
    fn = jax.jit(apply_fn)
    jax.block_until_ready(fn(member, images))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(member, images))
        times.append(time.perf_counter() - started)
    return float(images.shape[0] / np.median(times))
