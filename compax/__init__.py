"""compax: what model compression does to a CNN beyond test accuracy.

`launch.py` runs whole studies; this is the API for exploring them in a notebook or a script:

- `load_run(workdir)`: a run's outputs, read back (`FinishedRun`: config, dataset, original and
  compressed populations, results, per-member test predictions, analysis arrays);
- `compress_model(recipe, model, variables, ...)`: one model compressed by a recipe, and
  `FinishedRun.compress(recipe)`: a run's whole population;
- `analyse(analysis, original, compressed, dataset, config)`: one registered analysis
  (`compax.analyses`) of one population against another.

A recipe is a registered variant's name (`compax.compress.registry.RECIPES`, e.g. "pruned") or
`name=step(key=value,...)+step(...)` text, e.g. "p70=l1_global(amount=0.7)+quantize(weight_bits=4)".
Nothing is imported until a function is called, so `import compax` stays light.

>>> import compax
>>> run = compax.load_run("runs/quickstart")  # python launch.py --config=configs/quickstart.py
>>> run.config.model, run.config.population
('lenet5', 2)
>>> "pruned" in run.variants
True
"""

__all__ = ["FinishedRun", "analyse", "compress_model", "load_run"]


def load_run(workdir):
    """The run in `workdir` as a `FinishedRun`, which reads each output when first used.

    >>> import compax
    >>> run = compax.load_run("runs/quickstart")
    >>> run.original["params"]["conv1"]["kernel"].shape  # members, 5 x 5, RGB, filters
    (2, 5, 5, 3, 6)
    >>> run.variant("pruned").compressed.variables["params"]["conv1"]["kernel"].shape
    (2, 5, 5, 3, 6)

    Per-member test predictions, (members, test images); "baseline" is the original population.
    The share of test images each pruned member predicts differently from its original is
    the classes analysis's "disagreement" (a mean over members) in results.json, where each
    analysis's results of a variant are under the analysis's name:

    >>> original, pruned = run.predictions("baseline"), run.predictions("pruned")
    >>> flipped = (original != pruned).mean(axis=1)
    >>> flipped.shape
    (2,)
    >>> measured = run.results["variants"]["pruned"]["classes"]["disagreement"]
    >>> bool(abs(flipped.mean() - measured) < 1e-6)
    True
    >>> change = run.arrays("pruned")["classes"]["class_accuracy_change_pp"]
    >>> change.shape == (run.dataset.num_classes,)
    True

    A recipe the run did not make, on its whole population (nothing is saved):

    >>> run.compress("p50=l1_global(amount=0.5)").info["sparsity"]["amount"]
    0.5
    """
    from compax.finished_run import FinishedRun

    return FinishedRun(workdir)


def compress_model(recipe, model, variables, calib_images=None, masks=None, **quantization):
    """One model's `variables` (no member axis) compressed by `recipe`, as a
    `compax.compress.Compressed` (evaluate it with `compax.compress.apply_compressed`).

    Quantizing recipes calibrate on `calib_images` (normalised training images). `masks` (True =
    kept, from `compax.compress.global_l1_masks`) replace those pruning would compute; a recipe
    that prunes at amount=searched needs them. `quantization`: `reduce_range`, `observer` (see
    `compax.one_model.compress`, which this calls).

    >>> import compax
    >>> from compax.data import normalize
    >>> from compax.member_vmap import take_members
    >>> run = compax.load_run("runs/quickstart")
    >>> member = take_members(run.original, 0)
    >>> calib = normalize(run.dataset.train.images[:64], run.dataset.mean, run.dataset.std)
    >>> small = compax.compress_model("p70_w4=l1_global(amount=0.7)+quantize(weight_bits=4)",
    ...                               run.model, member, calib)
    >>> small.weight_bits, small.activation_bits
    (4, 8)
    >>> kernel = small.variables["params"]["fc1"]["kernel"]  # 400 x 120, the largest layer
    >>> bool((kernel == 0).mean() > 0.7)
    True
    """
    from compax.one_model import compress

    return compress(recipe, model, variables, calib_images, masks, **quantization)


def analyse(analysis, original, compressed, dataset, config=None, **settings):
    """(results, arrays) of the registered `analysis` (e.g. "classes", "calibration"; see
    `compax.analyses`) of the population `compressed` against `original`, on `dataset`'s test set.

    `original` and `compressed` are `compax.compress.registry.Variant`s (`FinishedRun.variant`,
    `FinishedRun.compress`); member m of one is compared with member m of the other. `config`
    gives the analysis settings and batch size (default `compax.config.base_config()`);
    `settings` replace some of the analysis's block `config.analysis.<analysis>` (e.g. bins=10
    for calibration). The results are the variant's `results["variants"][name][analysis]` in
    results.json.

    >>> import compax
    >>> run = compax.load_run("runs/quickstart")
    >>> results, arrays = compax.analyse("calibration", run.variant("baseline"),
    ...                                  run.variant("pruned"), run.dataset, run.config)
    >>> bool(abs(results["mce"] - run.results["variants"]["pruned"]["calibration"]["mce"]) < 1e-6)
    True
    >>> _, coarse = compax.analyse("calibration", run.variant("baseline"), run.variant("pruned"),
    ...                            run.dataset, run.config, bins=5)
    >>> len(arrays["reliability_accuracy"]), len(coarse["reliability_accuracy"])
    (15, 5)
    """
    from compax.analyse_population import compare_populations
    from compax.config import base_config

    return compare_populations(analysis, base_config() if config is None else config, dataset,
                               original, compressed, **settings)


def __getattr__(name):
    """`compax.FinishedRun`, imported when first named."""
    if name == "FinishedRun":
        from compax.finished_run import FinishedRun

        return FinishedRun
    raise AttributeError(f"module 'compax' has no attribute {name!r}")
