"""Compresses a trained population into every variant of the studies and measures it on the test set.

The pruning amount follows Schwaiger et al. (2022): "as much as possible while keeping comparable
accuracy", made precise as the largest level of a grid (default 0.01 ... 0.99) whose validation
accuracy, averaged over the population, stays within `tolerance_pp` percentage points of the
uncompressed population's; the test set plays no part in the choice. One level serves the whole
population so that its members stay comparable (Hooker et al. prune every member alike). Every
member is then pruned with global L1 masks at that level and quantized with post-training
quantization calibrated on training images (`compax.compress`).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from compax.compress import (
    apply_compressed,
    compress,
    compression_ratio,
    global_l1_masks,
    select_max_sparsity,
    size_bytes,
    sparsity_report,
)
from compax.compress.sweep import level_counts, sparsity_sweep
from compax.data import Dataset, normalize
from compax.distributed import to_host
from compax.population import chunked_vmap, loss_and_accuracy, make_predict, model_apply, take_members


def batched_accuracy(apply, x: jax.Array, labels: jax.Array, batch_size: int) -> jax.Array:
    """Accuracy of `apply(x_batch) -> logits` over normalised images `x`, `batch_size` at a time."""
    num = labels.shape[0]
    pad = (-num) % batch_size
    xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(-1, batch_size, *x.shape[1:])
    lb = jnp.pad(labels, (0, pad), constant_values=-1).reshape(-1, batch_size)  # pads never match
    correct = jax.lax.map(lambda a: jnp.sum(jnp.argmax(apply(a[0]), -1) == a[1]), (xb, lb))
    return correct.sum() / num


def sweep_validation_accuracy(model, variables, dataset: Dataset, levels, exclude, batch_size: int,
                              chunk: int) -> np.ndarray:
    """Validation accuracy (P, levels) of every member pruned at every level (global L1)."""
    x = normalize(dataset.val.images, dataset.mean, dataset.std)
    labels = jnp.asarray(dataset.val.labels)

    def member_sweep(v):
        def accuracy(params):
            return batched_accuracy(lambda xb: model.apply({**v, "params": params}, xb, train=False),
                                    x, labels, batch_size)
        return sparsity_sweep(v["params"], levels, accuracy, exclude=exclude, batch_size=1)

    return to_host(chunked_vmap(member_sweep, chunk, num_member_args=1)(variables))


def calibration_images(config: ml_collections.ConfigDict, dataset: Dataset) -> jax.Array:
    """Normalised training images for the quantization observers, a fixed random subset."""
    rng = np.random.default_rng(config.split_seed)
    count = min(config.compress.calibration_images, len(dataset.train))
    index = np.sort(rng.choice(len(dataset.train), count, replace=False))
    return normalize(dataset.train.images[index], dataset.mean, dataset.std)


def member_compressor(config: ml_collections.ConfigDict, model, variant: str):
    """`fn(variables, masks, calib_images) -> Compressed`: one member's `variant` (the masks are
    used by the pruned variants, the calibration images by the quantized ones)."""
    settings = config.compress
    pruned = variant.startswith("pruned")

    def compress_member(v, m, calib):
        return compress(variant, model, v, calib, m if pruned else None,
                        reduce_range=settings.reduce_range, observer=settings.observer)

    return compress_member


def abstract_population(config: ml_collections.ConfigDict, model, variables, dataset: Dataset,
                        variant: str):
    """Shapes and static data of the compressed population of `variant` (for restoring it)."""
    calib = jax.ShapeDtypeStruct(calibration_images(config, dataset).shape, jnp.float32)
    masks = jax.eval_shape(
        jax.vmap(lambda p: global_l1_masks(p, 1, exclude=config.compress.prune_exclude)),
        variables["params"])
    return jax.eval_shape(jax.vmap(member_compressor(config, model, variant), in_axes=(0, 0, None)),
                          variables, masks, calib)


def compress_population(config: ml_collections.ConfigDict, model, variables, dataset: Dataset,
                        chunk: int) -> dict:
    """Every variant in `config.compress.variants` of the population `variables`.

    Returns {"variants": {name: results (schema in pipeline.py)}, "sparsity_search": ...,
    "populations": {name: Compressed with a leading member axis}}.
    """
    settings = config.compress
    size = jax.tree.leaves(variables)[0].shape[0]
    predict = make_predict(lambda c, x: apply_compressed(model, c, x), dataset.mean, dataset.std,
                           config.eval_batch_size, chunk)

    levels = np.round(np.arange(1, 100) * settings.sparsity_step, 6)
    levels = levels[levels < 1]
    sweep = sweep_validation_accuracy(model, variables, dataset, levels, settings.prune_exclude,
                                      config.eval_batch_size, chunk)
    baseline_val = loss_and_accuracy(
        make_predict(model_apply(model), dataset.mean, dataset.std, config.eval_batch_size,
                     chunk)(variables, dataset.val.images),
        dataset.val.labels)[1]
    amount = select_max_sparsity(levels, sweep.mean(0), float(baseline_val.mean()),
                                 settings.sparsity_tolerance_pp)
    count = int(level_counts(take_members(variables, 0)["params"], [amount],
                             exclude=settings.prune_exclude)[0])
    masks = jax.vmap(lambda p: global_l1_masks(p, count, exclude=settings.prune_exclude))(
        variables["params"])
    reports = [sparsity_report(take_members(variables, i)["params"], take_members(masks, i))
               for i in range(size)]
    sparsity = {
        "amount": amount,
        "fraction_of_weights": float(np.mean([r["fraction_of_weights"] for r in reports])),
        "fraction_of_params": float(np.mean([r["fraction_of_params"] for r in reports])),
        "layers": {name: float(np.mean([r["layers"][name] for r in reports]))
                   for name in reports[0]["layers"]},
    }
    search = {"levels": levels.tolist(), "val_accuracy": sweep.mean(0).tolist(),
              "baseline_val_accuracy": float(baseline_val.mean()),
              "tolerance_pp": settings.sparsity_tolerance_pp, "chosen": amount}

    calib = calibration_images(config, dataset)
    results, populations = {}, {}
    for variant in settings.variants:
        compressed = chunked_vmap(member_compressor(config, model, variant), chunk,
                                  num_member_args=2)(variables, masks, calib)
        populations[variant] = compressed
        _, accuracy = loss_and_accuracy(predict(compressed, dataset.test.images),
                                        dataset.test.labels)
        first = take_members(compressed, 0)
        results[variant] = {
            "accuracy": float(accuracy.mean()),
            "accuracy_std": float(accuracy.std()),
            "member_accuracy": accuracy.tolist(),
            "sparsity": sparsity if variant.startswith("pruned") else None,
            "weight_bits": first.weight_bits,
            "activation_bits": first.activation_bits,
            "bytes": int(size_bytes(first)),
            "compression_ratio": float(compression_ratio(first, take_members(variables, 0))),
        }
    return {"variants": results, "sparsity_search": search, "populations": populations}
