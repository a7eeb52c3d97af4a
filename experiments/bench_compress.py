"""Benchmark: global L1 pruning masks and fake quantization on this machine.

1. Time to build global L1 masks over every conv and dense kernel of a ResNet-18 (10 classes,
   about 11M weights; random weights of the model's shapes) at amount 0.5: compax's jitted
   `global_l1_masks` (after warm-up) against `torch.nn.utils.prune.global_unstructured` with
   L1Unstructured on the same weights (when PyTorch is installed), medians of several repeats, and
   whether the masks are identical.
2. Fake-quantization throughput (per tensor and per channel, 8 bits) in GB/s of input, against
   the memory-copy bandwidth measured in the same run (the faster of `np.copyto` of an array of the
   same size and XLA's in-place negation of it, both one read and one write of every byte; see
   `bench_fake_quant` for why the kernel is timed in place).

Timings are wall-clock medians and noisy when other processes share the CPU. The last line printed
is one JSON object with the results.

    python experiments/bench_compress.py [--repeats 5] [--fakequant-mib 128]
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from compax.compress import fake_quant, global_l1_masks
from compax.compress.paths import weight_leaves
from compax.models import get_model, init_variables

AMOUNT = 0.5


def median_seconds(fn, repeats: int, setup=lambda: None) -> float:
    """Median wall time of fn(setup()) over `repeats` runs (setup is not timed)."""
    times = []
    for _ in range(repeats):
        arg = setup()
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resnet18_params(seed: int = 0):
    """ResNet-18 (10 classes) params of the model's shapes, drawn with NumPy."""
    model = get_model("resnet18", 10)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype), shapes)


def bench_masks(params, repeats: int) -> dict:
    weights = weight_leaves(params)
    build = jax.jit(global_l1_masks, static_argnames="amount")
    masks = jax.block_until_ready(build(params, amount=AMOUNT))  # warm-up and compile
    compax_s = median_seconds(lambda _: jax.block_until_ready(build(params, amount=AMOUNT)),
                              repeats)
    result = {"weights": sum(int(w.size) for _, w in weights), "compax_mask_s": compax_s}
    try:
        import torch
        from torch.nn.utils import prune
    except ImportError:
        return result

    def fresh_modules():
        modules = []
        for _, w in weights:  # torch layouts: conv (out, in, kh, kw), dense (out, in)
            module = torch.nn.Module()
            w = np.asarray(w).transpose((3, 2, 0, 1) if w.ndim == 4 else (1, 0))
            module.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(w)))
            modules.append(module)
        return modules

    def torch_prune(modules):
        prune.global_unstructured([(m, "weight") for m in modules],
                                  pruning_method=prune.L1Unstructured, amount=AMOUNT)

    torch_s = median_seconds(torch_prune, repeats, fresh_modules)
    modules = fresh_modules()
    torch_prune(modules)
    ours = [m for m in jax.tree.leaves(masks, is_leaf=lambda m: m is None) if m is not None]
    same = all(np.array_equal(np.asarray(o), m.weight_mask.numpy().astype(bool).transpose(
        (2, 3, 1, 0) if o.ndim == 4 else (1, 0))) for o, m in zip(ours, modules, strict=True))
    return {**result, "torch_mask_s": torch_s, "torch_threads": torch.get_num_threads(),
            "masks_identical": same, "ratio_mask_time_torch_vs_compax": torch_s / compax_s}


def bench_fake_quant(mib: int, repeats: int) -> dict:
    """GB/s of input for 8-bit fake quantization and for copies of the same array.

    XLA's CPU allocator hands every large output fresh pages, whose first-touch faults cap any
    op with a new output (a plain `jnp.copy` too) far below memory bandwidth; inside a jitted model
    buffers are reused. So the kernel is timed in place (input buffer donated to the output)
    against the copy limit: the faster of `np.copyto` into an existing array (one thread) and an
    in-place XLA negation (every thread), each reading and writing every byte once; and with a
    fresh output against `jnp.copy`.
    """
    n = mib * 2**20 // 4
    host = np.random.default_rng(0).normal(size=n).astype(np.float32)
    target = np.empty_like(host)
    gb = host.nbytes / 1e9
    channels = 512
    scale, zero = jnp.full((channels,), 0.02, jnp.float32), jnp.zeros((channels,), jnp.int32)
    kernels = {
        "per_tensor": lambda x: fake_quant(x, jnp.float32(0.02), jnp.int32(3), 0, 255),
        "per_channel": lambda x: fake_quant(x, scale, zero, -128, 127, axis=1),
        "jnp_copy": jnp.copy,
        "negate": jnp.negative,
    }

    def gbps(kernel, donate: bool) -> float:
        run = jax.jit(kernel, donate_argnums=0 if donate else ())
        x = jnp.asarray(host.reshape(-1, channels))
        times = []
        for _ in range(repeats + 1):  # the first run compiles
            start = time.perf_counter()
            y = jax.block_until_ready(run(x))
            times.append(time.perf_counter() - start)
            x = y if donate else x
        return gb / statistics.median(times[1:])

    result = {"fakequant_mib": mib,
              "np_copyto_GBps": gb / median_seconds(lambda _: np.copyto(target, host), repeats),
              "negate_in_place_GBps": gbps(kernels.pop("negate"), donate=True)}
    result["memcpy_GBps"] = max(result["np_copyto_GBps"], result["negate_in_place_GBps"])
    for name, kernel in kernels.items():
        result[f"{name}_fresh_output_GBps"] = gbps(kernel, donate=False)
        if name != "jnp_copy":
            result[f"fakequant_{name}_in_place_GBps"] = gbps(kernel, donate=True)
    result["fakequant_fraction_of_memcpy"] = (result["fakequant_per_tensor_in_place_GBps"]
                                              / result["memcpy_GBps"])
    result["fakequant_fresh_output_fraction_of_jnp_copy"] = (
        result["per_tensor_fresh_output_GBps"] / result["jnp_copy_fresh_output_GBps"])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fakequant-mib", type=int, default=128)
    args = parser.parse_args()
    masks = bench_masks(resnet18_params(), args.repeats)
    print(f"global L1 masks, ResNet-18 ({masks['weights']:,} weights, amount {AMOUNT}): "
          f"compax {masks['compax_mask_s']:.3f} s", end="")
    if "torch_mask_s" in masks:
        print(f", torch {masks['torch_mask_s']:.3f} s ({masks['torch_threads']} threads), "
              f"torch/compax {masks['ratio_mask_time_torch_vs_compax']:.2f}x, "
              f"identical masks: {masks['masks_identical']}")
    else:
        print(" (torch not installed)")
    fq = bench_fake_quant(args.fakequant_mib, args.repeats)
    print(f"fake quant, {fq['fakequant_mib']} MiB float32, in place: per tensor "
          f"{fq['fakequant_per_tensor_in_place_GBps']:.2f} GB/s, per channel "
          f"{fq['fakequant_per_channel_in_place_GBps']:.2f} GB/s; copy limit "
          f"{fq['memcpy_GBps']:.2f} GB/s (np.copyto {fq['np_copyto_GBps']:.2f}, in-place negation "
          f"{fq['negate_in_place_GBps']:.2f}); fraction of memcpy "
          f"{fq['fakequant_fraction_of_memcpy']:.2f}")
    print(f"with a fresh output: per tensor {fq['per_tensor_fresh_output_GBps']:.2f} GB/s, "
          f"per channel {fq['per_channel_fresh_output_GBps']:.2f} GB/s, jnp.copy "
          f"{fq['jnp_copy_fresh_output_GBps']:.2f} GB/s; fraction of jnp.copy "
          f"{fq['fakequant_fresh_output_fraction_of_jnp_copy']:.2f}")
    print(json.dumps({**masks, **fq, "devices": str(jax.devices()), "jax": jax.__version__}))


if __name__ == "__main__":
    main()
