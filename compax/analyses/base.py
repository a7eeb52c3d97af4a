"""The base of the registered analyses: `Analysis`, `register_analysis`, the settings blocks, and
the small helpers analyses share (subsets of test images, mean ± std, report formatting).

The analysis modules import this module, and `compax/analyses/__init__.py` imports them, so that
nothing in the package imports its own `__init__`: see that file for what an analysis writes.
"""

import dataclasses
import re
from typing import ClassVar

import ml_collections
import numpy as np
from absl import logging

from compax.errors import UserError

ANALYSES: dict[str, type["Analysis"]] = {}
# `--config.analysis.analyses` for every registered analysis that applies to the run's model.
DEFAULT = "default"
# The fields that the train, compress and export stages write into a variant's record in results.json
# (`compax/pipeline.py`, `compax/compress_population.py`, and what steps report in `info`): an
# analysis's results sit beside them under its name, so no analysis may take one of these names.
RESERVED_NAMES = frozenset({
    "accuracy", "accuracy_std", "member_accuracy", "accuracy_diff_pp", "sparsity", "weight_bits",
    "activation_bits", "bytes", "bytes_on_disk_population", "compression_ratio", "params", "macs",
    "int8", "recipe", "structure", "training", "design", "export"})


def register_analysis(cls):
    """Class decorator: makes the `Analysis` subclass `cls` selectable as `cls.name` (lower-case
    letters, digits and underscores: it names its results, arrays and settings block; not one of
    `RESERVED_NAMES`, the fields of a variant's record that other stages write)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", cls.name):
        raise ValueError(f"analysis name {cls.name!r}: use lower-case letters, digits and '_'")
    if cls.name in RESERVED_NAMES:
        raise ValueError(f"analysis name {cls.name!r} is a field of every variant's record in"
                         " results.json: choose another name")
    ANALYSES[cls.name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What an analysis's `applies` knows of the data before any stage: the number of classes
    and the shape of one image (H, W, C)."""

    num_classes: int
    image_shape: tuple[int, ...]

    @classmethod
    def of(cls, dataset) -> "DataInfo":
        """The `DataInfo` of a loaded `compax.data.Dataset`."""
        return cls(dataset.num_classes, tuple(dataset.test.images.shape[1:]))


class Analysis:
    """Base of the registered analyses (module doc). An instance holds its settings block."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    settings: ClassVar[dict] = {}

    def __init__(self, settings: ml_collections.ConfigDict | None = None):
        self.settings = ml_collections.ConfigDict(dict(self.settings)) if settings is None else settings

    @classmethod
    def check(cls, settings: ml_collections.ConfigDict) -> None:
        """Raises a one-line UserError for a bad value in `settings`, this analysis's block."""

    @classmethod
    def applies(cls, model, data: DataInfo) -> str | None:
        """None when this analysis can analyse the flax module `model` on `data`, else why not
        (one line)."""
        return None

    def prepare(self, ref) -> None:
        """Work on the original population that every variant's comparison reuses."""

    def baseline(self, ref) -> tuple[dict, dict]:
        return {}, {}

    def compare(self, ref, variant) -> tuple[dict, dict]:
        raise NotImplementedError

    def columns(self, results: dict) -> dict[str, str]:
        return {}

    def report(self, page, results: dict, arrays: dict) -> None:
        """Adds tables (`page.table`) and figures (`page.figure`) to the report: `results` are
        this analysis's results per variant ({"baseline" or variant: results}), `arrays` its
        arrays keyed "<variant>.<key>"; `page.run` is the whole results.json."""


def named_analyses(text: str) -> tuple[str, ...]:
    """The analyses `--config.analysis.analyses` names: every registered one for "default",
    else those of the comma-separated list."""
    if text.strip() == DEFAULT:
        return tuple(ANALYSES)
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in ANALYSES]
    if unknown or not names:
        raise UserError(f"unknown analysis {unknown[0] if unknown else '(none)'!r} in"
                        f" --config.analysis.analyses: use {DEFAULT} or a comma-separated subset"
                        f" of {','.join(ANALYSES)}")
    return names


def settings_block(settings: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config.analysis.<name>`: the settings of the analysis `name` (empty where it has none)."""
    return settings[name] if name in settings else ml_collections.ConfigDict()


def check_analyses(settings: ml_collections.ConfigDict) -> tuple[Analysis, ...]:
    """The analyses `settings` (`config.analysis`) names, each having checked its settings block
    (one-line UserError otherwise)."""
    analyses = []
    for name in named_analyses(settings.analyses):
        block = settings_block(settings, name)
        missing = [key for key in ANALYSES[name].settings if key not in block]
        if missing:
            raise UserError(f"the config has no --config.analysis.{name}.{missing[0]} (a config of"
                            " an older compax, with flat analysis settings?): take the keys of"
                            " compax/config.py")
        ANALYSES[name].check(block)
        analyses.append(ANALYSES[name](block))
    return tuple(analyses)


def applicable_analyses(settings: ml_collections.ConfigDict, model,
                        data: DataInfo) -> tuple[tuple[Analysis, ...], dict[str, str]]:
    """(the analyses to run, {skipped analysis: why}) for the flax module `model` on `data`.

    With the default list an analysis that does not apply is skipped and its reason logged; one
    named in a list of the user's is a one-line UserError."""
    analyses, skipped = [], {}
    for analysis in check_analyses(settings):
        reason = analysis.applies(model, data)
        if reason is None:
            analyses.append(analysis)
        elif settings.analyses.strip() == DEFAULT:
            skipped[analysis.name] = reason
            logging.info("analysis %s skipped: %s", analysis.name, reason)
        else:
            raise UserError(f"analysis {analysis.name} does not apply to {type(model).__name__}"
                            f" ({reason}): leave it out of --config.analysis.analyses")
    return tuple(analyses), skipped


def subset(count: int, total: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` test images (0 or >= total: all), fixed by the seed."""
    if count <= 0 or count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))


def mean_std(values) -> dict:
    """{"mean", "std"} over members (ddof 0) of per-member numbers, NaN members left out."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"mean": None, "std": None}
    return {"mean": float(finite.mean()), "std": float(finite.std())}


def finite(a):
    """`a` as plain floats / lists with NaN (an empty group) as None, which JSON can hold."""
    a = np.asarray(a)
    if a.ndim == 0:
        return a.item() if np.isfinite(a) else None
    return [finite(x) for x in a]


def integer_setting(settings: ml_collections.ConfigDict, name: str, key: str, low: int) -> None:
    """A one-line UserError unless `settings[key]` of analysis `name` is an integer >= `low`."""
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"--config.analysis.{name}.{key} must be an integer >= {low}, got"
                        f" {value!r}")


def fmt(value, digits=2, signed=False, scale=1.0) -> str:
    """A number for the report: fixed digits, optional sign and scale; '–' for missing."""
    if isinstance(value, dict):
        value = value.get("mean")
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{scale * value:+.{digits}f}" if signed else f"{scale * value:.{digits}f}"


def fmt_mean_std(stats: dict | None, digits=2, scale=1.0, signed=False) -> str:
    """'mean ± std' of a `mean_std` dict."""
    if not stats or stats.get("mean") is None:
        return "–"
    return f"{fmt(stats['mean'], digits, signed, scale)} ± {fmt(stats['std'], digits, False, scale)}"
