"""Defaults of every experiment config; `configs/*.py` start from `base_config()` and change keys.

The keys are locked: a `--config.key=value` override of a key that does not exist is an error,
and the types are checked (`ml_collections`). Importing this module imports no numerical library
but numpy (not jax, optax, orbax, scipy nor scikit-learn): the analyses' declarations, whose
settings are keys here, import them only to compute, so that a config loads, and a mistyped key
is reported, in a fraction of a second.
"""

import ml_collections
from ml_collections import config_dict

from compax.analyses import ANALYSES, DEFAULT


def base_config() -> ml_collections.ConfigDict:
    """The keys of an experiment with their defaults (LeNet-5 on the embedded synthetic_signs)."""
    c = ml_collections.ConfigDict()
    # Data (compax.data): name, where the offline files are (None: $COMPAX_DATA_DIR, then
    # ../shared/datasets), whether to build them online with tensorflow-datasets, the validation split.
    c.dataset = "synthetic_signs"
    c.data_dir = config_dict.placeholder(str)
    c.download = False
    c.split_seed = 0
    c.val_fraction = config_dict.placeholder(float)
    # Model (compax.models).
    c.model = "lenet5"
    c.model_width = 1.0
    # Training (compax.train): members have seeds seed, seed + 1, ..., seed + population - 1.
    c.seed = 0
    c.population = 1
    # Members vmapped together; 0: automatic (all on accelerators, one at a time on the CPU;
    # training on one CPU: all in one program, 4 at a time, `compax.member_vmap.train_chunking`).
    c.population_chunk = 0
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.learning_rate = 1e-3
    c.max_epochs = 100
    c.patience = 40
    c.augment = False
    c.progress = True
    # Compression (compax.compress_population): the variants made of every member, each a name
    # of compax.compress.registry.RECIPES or 'name=step(key=value,...)+step(...)' with the steps of
    # compax.compress.registry.STEPS, e.g. 'p50_w8=l1_global(amount=0.5)+quantize(weight_bits=8)';
    # the pruning level 'searched' (largest multiple of sparsity_step within sparsity_tolerance_pp
    # of the uncompressed validation accuracy), layers kept dense (regex on 'conv1/kernel'-like
    # paths), and the activation observers of post-training quantization (calibrated on training
    # images), which the quantize steps use unless they set their own.
    c.compress = ml_collections.ConfigDict()
    c.compress.variants = ("pruned", "w8a8", "w4a8", "pruned_w8a8", "float16", "bfloat16",
                           "weight_only_int8", "dynamic_int8")
    c.compress.sparsity_step = 0.01
    c.compress.sparsity_tolerance_pp = 1.0
    c.compress.prune_exclude = config_dict.placeholder(str)
    c.compress.calibration_images = 1000
    # "histogram" (exact, one pass), "histogram_batches" (PyTorch's HistogramObserver fed batches
    # of 128 images, merging their histograms as it does) or "minmax".
    c.compress.observer = "histogram"
    c.compress.reduce_range = True  # fbgemm's 7-bit activation range, as PyTorch's default qconfig
    # Analyses (compax.analyses) of every variant against the uncompressed population: "default"
    # (every registered one that applies to the model; the others are skipped, with the reason in
    # the report) or a comma-separated subset of the registered ones (each must apply), and the
    # settings each declares in its own block, `analysis.<name>.<key>` (image counts of 0 mean the
    # whole test set).
    c.analysis = ml_collections.ConfigDict()
    c.analysis.analyses = DEFAULT
    for analysis in ANALYSES.values():
        if analysis.settings:
            c.analysis[analysis.name] = ml_collections.ConfigDict(dict(analysis.settings))
    # Export (compax/export_population.py): ONNX files of the trained population and of every
    # variant ("all" members, or the "first" only), run by onnxruntime and compared with compax on
    # the test set; images/s of member 0 on `timing_images` test images, the fastest of
    # `timing_rounds` interleaved rounds, with onnxruntime's intra-op `threads` (0: one per core).
    c.export = ml_collections.ConfigDict()
    c.export.members = "all"
    c.export.timing_images = 512
    c.export.timing_rounds = 3
    c.export.threads = 0
    # Static int8 biases in int32 on the grid s_x * s_w, which onnxruntime's integer kernels take
    # (False: compax's float bias as an Add after each layer, float kernels, compax's function).
    c.export.integer_bias = True
    # Stages run (comma-separated, in this order): train, compress, analyse, export, report. A
    # finished stage whose config and inputs have not changed is skipped.
    c.stages = "train,compress,analyse,export,report"
    c.lock()
    return c


SIZES = ("auto", "cpu", "paper")


def chosen_size(size: str) -> str:
    """`size`, with `auto` resolved: `paper` where JAX's default backend is an accelerator, `cpu`
    on the CPU; the choice is logged."""
    if size not in SIZES:
        raise ValueError(f"unknown config size {size!r}: use configs/<name>.py:cpu or :paper"
                         " (no suffix: paper on an accelerator, cpu on the CPU)")
    if size != "auto":
        return size
    import jax
    from absl import logging

    backend = jax.default_backend()
    chosen = "cpu" if backend == "cpu" else "paper"
    logging.info("config size: %s (chosen for the %s backend; :cpu or :paper forces one)", chosen,
                 backend)
    return chosen


def study_config(dataset: str, model: str, size: str = "auto") -> ml_collections.ConfigDict:
    """One architecture x dataset pair of Schwaiger et al. (2022).

    `paper`: the study's setting (full width, Adam, early stopping with patience 40, CIFAR-10
    augmented by random flips and 4-px-pad random crops). `cpu`: the same data and procedure with
    the model narrowed and the patience shortened (the model's `cpu_size`) so that a run fits on 2 CPU cores.
    `auto`: `paper` on an accelerator, `cpu` on the CPU (`chosen_size`).
    """
    size = chosen_size(size)
    c = base_config()
    c.dataset = dataset
    c.model = model
    c.augment = dataset == "cifar10"
    if size == "paper":
        c.max_epochs = 500
        c.patience = 40
    else:
        from compax.models import cpu_size  # flax and jax: not needed to load a config

        c.model_width, c.max_epochs, c.patience = cpu_size(model)
    return c


HOOKER_LEVELS = (0.3, 0.5, 0.7, 0.9)


def hooker_config(dataset: str, arg: str = "") -> ml_collections.ConfigDict:
    """Hooker et al. (2019) as they ran it, on LeNet-5: `members` (30; `arg` "members=N")
    independently seeded members per level. `arg` "gmp_epochs=N" (alone or after a comma:
    "members=10,gmp_epochs=60") trains the gradual populations for up to N epochs with the
    baseline's early stopping instead of the gradual recipe's 12 epochs: 12 suffice on GTSRB, not
    on CIFAR-10 (the unpruned gradual population ends 7.5 pp below the baseline there).

    Level 0 is the baseline population (the CPU-sized `study_config`). Sparsity 0.3, 0.5, 0.7 and
    0.9 are reached by gradual magnitude pruning during training (Zhu & Gupta 2017, `gmp`), each
    level a population of its own, trained from scratch with seeds of its own (`seed_offset`: level
    0.3 uses seeds 1000.., and so on) and analysed as an independent sample (Welch); `gmp0` is the
    same recipe with no pruning on seeds 5000..: a second uncompressed population, the floor of
    the differences between independent populations. Beside them the
    post-training variants of the baseline members (one-shot global L1 at the searched level and at
    the same fixed levels, w8a8, w4a8, pruned+w8a8, float16, dynamic int8), analysed as paired
    samples (paired t, Wilcoxon, and Welch). Every analysis; saliency and Grad-CAM on 2,000 test
    images.
    """
    settings = {"members": 30, "gmp_epochs": None}
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        if key not in settings or not value.isdigit() or int(value) < 2:
            raise ValueError(f"unknown config argument {item!r}: use members=N (N >= 2) and/or "
                             "gmp_epochs=N (N >= 2), separated by a comma")
        settings[key] = int(value)
    c = study_config(dataset, "lenet5", "cpu")
    c.population = settings["members"]
    recipe = ("" if settings["gmp_epochs"] is None
              else f",epochs={settings['gmp_epochs']},patience={c.patience}")
    gradual = tuple(f"gmp{round(100 * s)}=gmp(final={s},seed_offset={1000 * (i + 1)}{recipe})"
                    for i, s in enumerate(HOOKER_LEVELS))
    # Level 0 of the gradual design: the same recipe without pruning, on seeds of its own. Against
    # the baseline it is the floor of what two independent uncompressed populations differ in
    # (impacted classes, CIEs, flips), the noise under every gmp level's figures.
    floor = f"gmp0=gmp(final=0.0,seed_offset={1000 * (len(HOOKER_LEVELS) + 1)}{recipe})"
    gradual = (floor,) + gradual
    one_shot = tuple(f"sparsity_{round(100 * s)}" for s in HOOKER_LEVELS)
    c.compress.variants = gradual + ("pruned",) + one_shot + (
        "w8a8", "w4a8", "pruned_w8a8", "float16", "dynamic_int8")
    c.analysis.saliency.images = 2000
    c.analysis.gradcam.images = 2000
    return c
