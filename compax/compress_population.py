"""Makes every variant of `compress.variants` from a trained population and measures it.

Each variant is a recipe of registered steps (`compax.compress.registry`) run on the whole
population. The pruning level `searched` follows Schwaiger et al. (2022): "as much as possible while
keeping comparable accuracy", made precise as the largest level of a grid (default 0.01 ... 0.99)
whose validation accuracy under the step's own pruning criterion and scope (global L1 for the
study's `l1_global`), averaged over the population, stays within `tolerance_pp` percentage points
of the uncompressed population's; each criterion is searched once per run; the test set plays no
part in the choice. One level serves the whole population so that its members stay comparable
(Hooker et al. prune every member alike). Quantizing steps calibrate on a fixed subset of training
images, which pruning criteria that need data also use, with their labels.

Every variant is measured on the whole test set: accuracy per member, bits, bytes as stored and the
compression ratio, parameters and multiply-adds of the model evaluating it; quantized variants with
8-bit activations also run on the true-int8 path (`int8_apply`), and their argmax agreement and
largest logit difference against the fake-quant model are reported. Inference cost (images/s of
member 0 on this machine, `cost.py`) is kept apart from the results, as it is a timing.

Given a `save_dir`, each variant is saved there (`<save_dir>/<name>`, `compax/compress/store.py`)
as soon as it is measured, with a record of what made it: its recipe, the settings of training
and compression (`compress.variants` aside) and the SHA-256 of the trained population. A run
killed midway, or one whose variant list changed, restores every saved variant whose record
matches instead of making it again, and makes the rest (and any whose files fail their checksums).
"""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from compax import registrations  # noqa: F401  (registers the compression steps)
from compax.compress import (
    Compressed,
    apply_compressed,
    compression_ratio,
    int8_apply,
    size_bytes,
)
from compax.compress.cost import images_per_second
from compax.compress.flops import model_macs
from compax.compress.registry import (
    STEPS,
    Context,
    Variant,
    describe,
    run_recipe,
    with_config_defaults,
)
from compax.compress.store import restore_compressed, restore_saved, save_compressed, saved_record
from compax.compress.sweep import select_max_sparsity, sparsity_sweep
from compax.data import Dataset, normalize
from compax.distributed import to_host
from compax.errors import UserError
from compax.member_vmap import chunked_vmap, loss_and_accuracy, make_predict, model_apply, take_members
from compax.models import count_params
from compax.stages import stage_config
from compax.train.retrain import tree_digest


def batched_accuracy(apply, x: jax.Array, labels: jax.Array, batch_size: int) -> jax.Array:
    """Accuracy of `apply(x_batch) -> logits` over normalised images `x`, `batch_size` at a time."""
    num = labels.shape[0]
    pad = (-num) % batch_size
    xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(-1, batch_size, *x.shape[1:])
    lb = jnp.pad(labels, (0, pad), constant_values=-1).reshape(-1, batch_size)  # pads never match
    correct = jax.lax.map(lambda a: jnp.sum(jnp.argmax(apply(a[0]), -1) == a[1]), (xb, lb))
    return correct.sum() / num


def sweep_validation_accuracy(model, variables, dataset: Dataset, levels, criterion,
                              shared: dict, batch_size: int, chunk: int) -> np.ndarray:
    """Validation accuracy (P, levels) of every member pruned by `criterion` (a pruning step,
    `compax.compress.criterion`) at every level: its scores computed once per member (from the
    step's `shared` inputs), then every level's selection evaluated."""
    x = normalize(dataset.val.images, dataset.mean, dataset.std)
    labels = jnp.asarray(dataset.val.labels)

    def member_sweep(v, member, x, labels, shared):  # data as arguments: no constants folded
        def accuracy(params):
            return batched_accuracy(lambda xb: model.apply({**v, "params": params}, xb, train=False),
                                    x, labels, batch_size)
        scores = criterion.member_scores(model, v, member, shared)
        return sparsity_sweep(v["params"], levels, accuracy, scores=scores, scope=criterion.scope,
                              exclude=criterion.exclude, batch_size=1)

    members = jnp.arange(jax.tree.leaves(variables)[0].shape[0], dtype=jnp.int32)
    return to_host(chunked_vmap(member_sweep, chunk, num_member_args=2)(
        variables, members, x, labels, shared))


def search_sparsity(config: ml_collections.ConfigDict, model, variables, dataset: Dataset,
                    chunk: int, criterion, shared: dict) -> dict:
    """The largest level of `criterion` (a pruning step; `shared`: its inputs) within the tolerance
    on validation data (module doc), with the curve it was read from: {criterion (its
    `search_key`), levels, val_accuracy, baseline_val_accuracy, tolerance_pp, chosen}."""
    settings = config.compress
    levels = np.round(np.arange(1, 100) * settings.sparsity_step, 6)
    levels = levels[levels < 1]
    sweep = sweep_validation_accuracy(model, variables, dataset, levels, criterion, shared,
                                      config.eval_batch_size, chunk)
    baseline_val = loss_and_accuracy(
        make_predict(model_apply(model), dataset.mean, dataset.std, config.eval_batch_size,
                     chunk)(variables, dataset.val.images),
        dataset.val.labels)[1]
    chosen = select_max_sparsity(levels, sweep.mean(0), float(baseline_val.mean()),
                                 settings.sparsity_tolerance_pp)
    return {"criterion": criterion.search_key(), "levels": levels.tolist(),
            "val_accuracy": sweep.mean(0).tolist(),
            "baseline_val_accuracy": float(baseline_val.mean()),
            "tolerance_pp": settings.sparsity_tolerance_pp, "chosen": chosen}


def _calibration_index(config: ml_collections.ConfigDict, dataset: Dataset) -> np.ndarray:
    """Training-set indices of the calibration images: a fixed random subset, in order."""
    rng = np.random.default_rng(config.split_seed)
    count = min(config.compress.calibration_images, len(dataset.train))
    return np.sort(rng.choice(len(dataset.train), count, replace=False))


def calibration_images(config: ml_collections.ConfigDict, dataset: Dataset) -> jax.Array:
    """Normalised training images for the quantization observers, a fixed random subset."""
    index = _calibration_index(config, dataset)
    return normalize(dataset.train.images[index], dataset.mean, dataset.std)


def restore_searches(ctx: Context, made: dict, config) -> None:
    """Puts the sparsity searches of earlier results (or of a saved variant's record) `made` into
    `ctx.cache`; results written before searches were per criterion hold one global-L1 search
    (named with the settings `config` gives it)."""
    searches = ctx.cache.setdefault("sparsity_searches", {})
    for key, search in made.get("sparsity_searches", {}).items():
        searches.setdefault(key, search)
    if "sparsity_search" in made and "sparsity_searches" not in made:
        default = with_config_defaults(STEPS["l1_global"](), config).search_key()
        searches.setdefault(default, made["sparsity_search"])


def recipe_context(config, model, variables, dataset: Dataset, chunk: int, *,
                   abstract: bool = False, log_dir=None, checkpoint_dir=None) -> Context:
    """The `Context` the recipes of a run share (one sparsity search per criterion, one labelled
    calibration set, the run's seed); training steps write TensorBoard scalars under `log_dir`
    and checkpoints under `checkpoint_dir` (None: none), see `Context`."""
    if abstract:
        count = min(config.compress.calibration_images, len(dataset.train))
        calib = jax.ShapeDtypeStruct((count, *dataset.train.images.shape[1:]), jnp.float32)
        labels = jax.ShapeDtypeStruct((count,), jnp.int32)
    else:
        calib = calibration_images(config, dataset)
        labels = jnp.asarray(dataset.train.labels[_calibration_index(config, dataset)])
    ctx = Context(dataset=dataset, original=variables, chunk=chunk, abstract=abstract,
                  calib_images=calib, calib_labels=labels, seed=config.seed,
                  batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                  augment=config.augment, population_chunk=config.population_chunk,
                  log_dir=log_dir, checkpoint_dir=checkpoint_dir)
    ctx.searcher = lambda criterion: search_sparsity(config, model, variables, dataset, chunk,
                                                     criterion, criterion.inputs(ctx))
    return ctx


def abstract_variant(config: ml_collections.ConfigDict, model, variables, dataset: Dataset,
                     chunk: int, steps) -> Variant:
    """The module and the shapes and static data of the population that `steps` make, without
    running anything (for restoring a saved variant)."""
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    return run_recipe(steps, model, like,
                      recipe_context(config, model, variables, dataset, chunk, abstract=True))


def measure(config, dataset: Dataset, model, variables, variant: Variant, chunk: int) -> dict:
    """Test results of one variant (schema in pipeline.py), against the original `variables`."""
    compressed = variant.compressed
    predict = make_predict(lambda c, x: apply_compressed(variant.model, c, x), dataset.mean,
                           dataset.std, config.eval_batch_size, chunk)
    logits = predict(compressed, dataset.test.images)
    _, accuracy = loss_and_accuracy(logits, dataset.test.labels)
    first = take_members(compressed, 0)
    results = {
        "accuracy": float(accuracy.mean()),
        "accuracy_std": float(accuracy.std()),
        "member_accuracy": accuracy.tolist(),
        "sparsity": variant.info.get("sparsity"),
        "weight_bits": first.weight_bits,
        "activation_bits": first.activation_bits,
        "bytes": int(size_bytes(first)),
        "compression_ratio": float(compression_ratio(first, take_members(variables, 0))),
        "params": count_params(first.variables["params"]),
        "macs": model_macs(lambda c, x: apply_compressed(variant.model, c, x), first,
                           dataset.test.images.shape[1:]),
        **{k: v for k, v in variant.info.items() if k != "sparsity"},
    }
    if compressed.qstate is not None and first.activation_bits <= 8:
        integer = make_predict(lambda c, x: int8_apply(variant.model, c.variables, c.qstate, x),
                               dataset.mean, dataset.std, config.eval_batch_size, chunk)(
            compressed, dataset.test.images)
        results["int8"] = {
            "argmax_agreement": float(np.mean(integer.argmax(-1) == logits.argmax(-1))),
            "max_logit_difference": float(np.max(np.abs(integer - logits))),
            "accuracy": float(np.mean(integer.argmax(-1) == dataset.test.labels[None])),
        }
    return results


def inference_cost(config, dataset: Dataset, variants: dict[str, Variant]) -> dict:
    """{name: {"images_per_second", "speedup_vs_float32", "int8_images_per_second"}} of member 0
    of every variant (and "baseline", the float32 model), on `eval_batch_size` test images, timed
    side by side (`cost.py`); the int8 path is timed where a variant has 8-bit activations."""
    x = normalize(dataset.test.images[:config.eval_batch_size], dataset.mean, dataset.std)
    models = {}
    for name, variant in variants.items():
        first = take_members(variant.compressed, 0)
        models[name] = (lambda c, b, m=variant.model: apply_compressed(m, c, b), first)
        if first.qstate is not None and first.activation_bits <= 8:
            models[f"{name}.int8"] = (
                lambda c, b, m=variant.model: int8_apply(m, c.variables, c.qstate, b), first)
    rates = images_per_second(models, x)
    cost = {}
    for name in variants:
        cost[name] = {"images_per_second": rates[name],
                      "speedup_vs_float32": rates[name] / rates["baseline"]}
        if f"{name}.int8" in rates:
            cost[name]["int8_images_per_second"] = rates[f"{name}.int8"]
    return cost


def variant_inputs(config: ml_collections.ConfigDict, variables) -> dict:
    """What every variant of a run is made from, for the records of saved variants: the config
    keys of training and compression (without `compress.variants`, so that adding a variant keeps
    the others) and the SHA-256 of the trained population."""
    settings = {**stage_config(config, "train"), **stage_config(config, "compress")}
    settings["compress"] = {k: v for k, v in settings["compress"].items() if k != "variants"}
    return {"settings": settings, "population_sha256": tree_digest(variables)}


def restore_variant(config, model, variables, dataset: Dataset, chunk: int, steps,
                    path: pathlib.Path) -> Variant:
    """The variant of `steps` saved at `path`, its files verified: as saved (module, structure,
    info), or, for a save without its structure (older compax), with the module and static data
    of the recipe traced abstractly."""
    saved = restore_saved(path)
    if saved is not None:
        return Variant(*saved)
    shaped = abstract_variant(config, model, variables, dataset, chunk, steps)
    return Variant(shaped.model, restore_compressed(path, shaped.compressed), shaped.info)


def compress_population(config: ml_collections.ConfigDict, model, variables, dataset: Dataset,
                        chunk: int, recipes: dict, log_dir=None, checkpoint_dir=None,
                        save_dir=None) -> dict:
    """Every variant of `recipes` ({name: steps}, `config.compress.variants` as `validate_config`
    parsed them) of the population `variables`.

    The training steps of a variant write their per-epoch scalars as TensorBoard event files in
    `<log_dir>/<variant>/<step>` (`compax/train/scalars.py`; None: none) and their per-epoch
    checkpoints in `<checkpoint_dir>/<variant>/<step>` (`compax/train/retrain.py`; None: none),
    from which a killed run resumes. Each finished variant is saved in `<save_dir>/<variant>`
    (None: not saved), from which a later run restores it (module doc).

    Returns {"variants": {name: results (schema in pipeline.py)}, "sparsity_searches":
    {criterion: search} (when a recipe searched the level) with "sparsity_search", the first of
    them, "inference": {name: cost}, "populations": {name: Compressed with a leading member
    axis}}.
    """
    ctx = recipe_context(config, model, variables, dataset, chunk, log_dir=log_dir,
                         checkpoint_dir=checkpoint_dir)
    inputs = variant_inputs(config, variables) if save_dir is not None else None
    results = {}
    made_variants = {"baseline": Variant(model, Compressed(variables, None))}
    for name, steps in recipes.items():
        record = {"inputs": inputs, "recipe": describe(steps)}
        path = pathlib.Path(save_dir) / name if save_dir is not None else None
        saved = saved_record(path) if path is not None else None
        restored = None
        if saved is not None and {k: saved.get(k) for k in record} == record:
            try:
                restored = restore_variant(config, model, variables, dataset, chunk, steps, path)
            except UserError as e:
                logging.warning("%s: made again, as its saved files cannot be used (%s)", name, e)
        if restored is not None:
            made_variants[name] = restored
            results[name] = saved["results"]
            restore_searches(ctx, saved, config)
            logging.info("%s: restored from %s, made by an earlier run", name, path)
            continue
        variant = run_recipe(steps, model, variables, ctx, name)
        made_variants[name] = variant
        results[name] = {"recipe": describe(steps),
                         **measure(config, dataset, model, variables, variant, chunk)}
        if path is not None:
            searches = ctx.cache.get("sparsity_searches")
            save_compressed(path, variant.compressed, module=variant.model, info=variant.info,
                            record={**record, "results": results[name],
                                    **({"sparsity_searches": searches} if searches else {})})
    made = {"variants": results, "inference": inference_cost(config, dataset, made_variants),
            "populations": {n: v.compressed for n, v in made_variants.items() if n != "baseline"}}
    if ctx.cache.get("sparsity_searches"):
        made["sparsity_searches"] = ctx.cache["sparsity_searches"]
        made["sparsity_search"] = next(iter(made["sparsity_searches"].values()))
    return made
