"""Every value of a config checked before a run touches its workdir.

`validate_config(config)` raises a `UserError` whose one line names the first bad
`--config.key`, the value it holds and what it takes; `pipeline.run` calls it first, so a typo
never trains, never creates a workdir and never changes a finished one. `RULES` holds one rule per
key of `compax/config.py` but the settings blocks of the analyses (`analysis.<name>.<key>`), which
each analysis checks itself (`compax/analyses`); a test checks that every key is covered, and keys
that a config does not have are skipped. The checks that need more than one key (seeds within
int32, an exclusion regex that leaves something to prune) follow the table, then every name:
datasets, models, stages, the observer, and what the registries hold (variants and their steps and
settings, `compax.compress.registry`; analyses and their settings, `compax.analyses`).
Values that depend on the data (a batch larger than the training set, an analysis named that
cannot apply to the model) are checked where the data are loaded
(`pipeline.load_checked_dataset`), before the workdir is created.
"""

import math
import re
from collections.abc import Callable

import ml_collections

from compax.errors import UserError

# A rule returns None for a good value, else what the key takes ("an integer >= 1").
Rule = Callable[[object], str | None]
INT32_MAX = 2**31 - 1


def integer(low: int, high: int | None = None) -> Rule:
    takes = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    return lambda v: (None if isinstance(v, int) and not isinstance(v, bool) and low <= v
                      and (high is None or v <= high) else takes)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Rule:
    """A finite int or float within [low, high] (or the open ends)."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    takes = "a finite number" + (" " + " and ".join(bounds) if bounds else "")

    def rule(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return takes
        if low is not None and (v <= low if low_open else v < low):
            return takes
        if high is not None and (v >= high if high_open else v > high):
            return takes
        return None
    return rule


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def text(v) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def optional(rule: Rule) -> Rule:
    return lambda v: None if v is None else (f"None or {p}" if (p := rule(v)) else None)


def names(v) -> str | None:
    """A tuple of distinct names, as `--config.compress.variants="('pruned','w8a8')"` gives."""
    takes = "a tuple of distinct names, e.g. \"('pruned','w8a8')\""
    if not isinstance(v, (tuple, list)) or not all(isinstance(x, str) and x for x in v):
        return takes
    return takes if len(set(v)) != len(v) else None


def regex(v) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        return "None or a Python regular expression"
    try:
        re.compile(v)
    except re.error as e:
        return f"a Python regular expression (this one: {e})"
    return None


RULES: dict[str, Rule] = {
    "dataset": text,
    "data_dir": optional(text),
    "download": boolean,
    "split_seed": integer(0, 2**32 - 1),
    "val_fraction": optional(number(0, 1, low_open=True, high_open=True)),
    "model": text,
    "model_width": number(0, low_open=True),
    "seed": integer(0, INT32_MAX),
    "population": integer(1),
    "population_chunk": integer(0),
    "batch_size": integer(1),
    "eval_batch_size": integer(1),
    "learning_rate": number(0, low_open=True),
    "max_epochs": integer(1),
    "patience": integer(1),
    "augment": boolean,
    "progress": boolean,
    "compress.variants": names,
    "compress.sparsity_step": number(0, 1, low_open=True, high_open=True),
    "compress.sparsity_tolerance_pp": number(0, 100),
    "compress.prune_exclude": regex,
    "compress.calibration_images": integer(1),
    "compress.observer": text,
    "compress.reduce_range": boolean,
    "analysis.analyses": text,  # "default" or names; their settings: each analysis's `check`
    "export.members": lambda v: None if v in ("all", "first") else "all or first",
    "export.timing_images": integer(1),
    "export.timing_rounds": integer(1),
    "export.threads": integer(0),
    "export.integer_bias": boolean,
    "stages": text,
}


class _Missing:
    pass


MISSING = _Missing()


def lookup(config: ml_collections.ConfigDict, key: str):
    """The value of the dotted `key`, or MISSING."""
    value = config
    for part in key.split("."):
        if not isinstance(value, ml_collections.ConfigDict) or part not in value:
            return MISSING
        value = value[part]
    return value


def bad(key: str, value, takes: str) -> UserError:
    """The one-line error for `--config.key=value`."""
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return UserError(f"bad --config.{key}={shown}: it takes {takes}")


def unknown(key: str, name, known) -> UserError:
    """The one-line error for a name that compax does not have."""
    return UserError(f"unknown {key.rpartition('.')[2]} {name!r} in --config.{key}: choose one of"
                     f" {', '.join(known)}")


def validate_config(config: ml_collections.ConfigDict) -> dict:
    """Raises a UserError naming the first bad value of `config`; when all are good, returns the
    recipes of `compress.variants` ({variant: steps}, parsed with the config's defaults), so that
    a run parses them once."""
    for key, rule in RULES.items():
        value = lookup(config, key)
        if value is not MISSING and (takes := rule(value)) is not None:
            raise bad(key, value, takes)
    _check_combinations(config)
    return _check_names(config)


def _check_combinations(config: ml_collections.ConfigDict) -> None:
    """The checks that involve more than one key."""
    seed, population = lookup(config, "seed"), lookup(config, "population")
    if MISSING not in (seed, population) and seed + population - 1 > INT32_MAX:
        raise bad("seed", seed, f"an integer <= {INT32_MAX - population + 1} with"
                  f" --config.population={population} (member seeds are int32)")
    exclude, model = lookup(config, "compress.prune_exclude"), lookup(config, "model")
    if isinstance(exclude, str) and isinstance(model, str):
        _check_exclude_leaves_weights(exclude, model, lookup(config, "model_width"))


def _check_exclude_leaves_weights(exclude: str, model_name: str, width) -> None:
    """An exclusion regex that matches every conv and dense kernel leaves nothing to prune."""
    import jax

    from compax.compress.paths import weight_leaves
    from compax.models import MODELS, get_model, init_variables

    if model_name not in MODELS:
        return  # the name check below reports it
    model = get_model(model_name, 10, 1.0 if width is MISSING else width)
    params = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"]
    if not weight_leaves(params, exclude):
        raise bad("compress.prune_exclude", exclude,
                  f"a regular expression that leaves some conv or dense kernel of {model_name}"
                  " unmatched (this one excludes them all: nothing could be pruned)")


def _check_calibration_batches(recipes: dict, calibration_images) -> None:
    """A pruning criterion that scores on a calibration batch (`needs` data or gradients) cannot
    take more images than the run calibrates on (fewer still when the training set is smaller:
    that is checked when the step runs)."""
    if calibration_images is MISSING:
        return
    for name, steps in recipes.items():
        for step in steps:
            if getattr(step, "needs", frozenset()) & {"data", "grads"} and step.batch > calibration_images:
                raise UserError(f"variant {name}: {step.name}(batch={step.batch}) takes more than the"
                                f" {calibration_images} calibration images: lower its batch or raise"
                                " --config.compress.calibration_images")


def _check_names(config: ml_collections.ConfigDict) -> dict:
    """Names checked against what compax has: datasets, models, stages, observers, and the
    registries' variants (their steps and settings) and analyses (their settings blocks); returns
    the parsed recipes ({} for a config without `compress.variants`)."""
    from compax import registrations  # noqa: F401  (fills the registries)
    from compax.analyses import check_analyses
    from compax.compress.ptq import OBSERVERS
    from compax.compress.registry import variant_recipes
    from compax.data import DATASETS
    from compax.models import MODELS
    from compax.stages import parse_stages

    dataset, model, stages = (lookup(config, k) for k in ("dataset", "model", "stages"))
    if dataset is not MISSING and dataset not in DATASETS:
        raise unknown("dataset", dataset, DATASETS)
    if model is not MISSING and model not in MODELS:
        raise unknown("model", model, sorted(MODELS))
    if stages is not MISSING and "export" in parse_stages(stages):
        from compax.export.runtime import require_onnx

        require_onnx()
    observer = lookup(config, "compress.observer")
    if observer is not MISSING and observer not in OBSERVERS:
        raise unknown("compress.observer", observer, OBSERVERS)
    variants, recipes = lookup(config, "compress.variants"), {}
    if variants is not MISSING:
        recipes = variant_recipes(variants, config)
        _check_calibration_batches(recipes, lookup(config, "compress.calibration_images"))
        if model is not MISSING:
            from compax.models import get_model

            width = lookup(config, "model_width")
            instance = get_model(model, 10, 1.0 if width is MISSING else width)
            for steps in recipes.values():
                for step in steps:
                    step.check(instance)
    if lookup(config, "analysis.analyses") is not MISSING:
        check_analyses(config.analysis)
    return recipes
