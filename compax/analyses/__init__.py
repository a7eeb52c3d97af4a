"""The analyses of a run, registered by name: each compares a compressed population with the original.

`compax.measure` holds the research as pure functions (confusion changes, ECE, saliency, Welch
tests, ...); each module here turns one of them into an analysis of a run, in the shape of
big_vision's evaluators:

- `settings`: the keys it reads from `config.analysis`, with defaults (`base_config` adds them),
  checked by `check` before any stage runs;
- `baseline(ref)`: results of the original population alone (e.g. its ECE);
- `compare(ref, variant)`: (results, arrays) of one compressed population against the original,
  results JSON-ready for results.json, arrays (numpy) for the figures;
- `columns(results)`: its headline cells of one variant in the report's summary table;
- `report(page, results, arrays)`: its tables and figures, drawn from results only.

A new analysis is one module with an `@register_analysis` class, plus its import in
`compax/registrations.py`. `compax/analyse_population.py` runs the enabled ones for every variant.
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from compax.compress import apply_compressed
from compax.data import Dataset, normalize
from compax.errors import UserError
from compax.member_vmap import make_predict

ANALYSES: dict[str, type["Analysis"]] = {}


def register_analysis(cls):
    """Class decorator: makes the `Analysis` subclass `cls` selectable as `cls.name`."""
    taken = {key: other.name for other in ANALYSES.values() if other.name != cls.name
             for key in other.settings}
    clash = [key for key in cls.settings if key in taken]
    if clash:
        raise ValueError(f"analysis {cls.name} declares setting {clash[0]!r} of {taken[clash[0]]}")
    ANALYSES[cls.name] = cls
    return cls


def parse_analyses(text: str) -> tuple[str, ...]:
    """The analyses named in a comma-separated `--config.analysis.analyses` value."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in ANALYSES]
    if unknown:
        raise UserError(f"unknown analysis {unknown[0]!r} in --config.analysis.analyses: use a"
                        f" comma-separated subset of {','.join(ANALYSES)}")
    return names


def check_analyses(settings: ml_collections.ConfigDict) -> tuple["Analysis", ...]:
    """The enabled analyses, each having checked its settings (one-line UserError otherwise)."""
    enabled = parse_analyses(settings.analyses)
    for name in enabled:
        ANALYSES[name].check(settings)
    return tuple(ANALYSES[name]() for name in enabled)


def subset(count: int, total: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` test images (0 or >= total: all), fixed by the seed."""
    if count <= 0 or count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))


def member_mean(tree):
    """Mean over the member axis of every array in `tree`, as plain floats / lists (NaN ignored)."""
    return jax.tree.map(lambda a: np.asarray(jnp.nanmean(jnp.asarray(a, jnp.float32), 0)).tolist(),
                        tree)


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


class Reference:
    """The test set and the original population's outputs, shared by every analysis of a run."""

    def __init__(self, config: ml_collections.ConfigDict, dataset: Dataset, model, original,
                 chunk: int):
        self.config, self.settings, self.dataset, self.chunk = config, config.analysis, dataset, chunk
        self.model, self.original = model, original
        self.labels = dataset.test.labels
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names
        self.x = normalize(dataset.test.images, dataset.mean, dataset.std)
        self.logits = self.predict(model, original)
        self.preds = self.logits.argmax(-1)

    @property
    def members(self) -> int:
        return self.logits.shape[0]

    def predict(self, model, population) -> np.ndarray:
        """Test logits (P, N, C) of a population of `Compressed`."""
        return population_logits(model, population, self.dataset, self.config.eval_batch_size,
                                 self.chunk)


def population_logits(model, population, dataset: Dataset, batch_size: int, chunk: int) -> np.ndarray:
    """Test logits (P, N, C) of `population`, a `Compressed` with a leading member axis evaluated
    by the flax module `model`, `batch_size` images and `chunk` members at a time."""
    fn = make_predict(lambda c, x: apply_compressed(model, c, x), dataset.mean, dataset.std,
                      batch_size, chunk)
    return fn(population, dataset.test.images)


@dataclasses.dataclass
class Compared:
    """One compressed population under analysis, with its test logits (P, N, C). `design`:
    "paired" when member m was compressed from original member m, "independent" when the
    population was trained on its own (`Variant.info["design"]`)."""

    name: str
    model: Any
    population: Any
    logits: np.ndarray
    design: str = "paired"

    @property
    def preds(self) -> np.ndarray:
        return self.logits.argmax(-1)


class Analysis:
    """Base of the registered analyses (module doc)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    settings: ClassVar[dict] = {}

    @classmethod
    def check(cls, settings: ml_collections.ConfigDict) -> None:
        """Raises a one-line UserError for a bad value of one of `settings`."""

    def prepare(self, ref: Reference) -> None:
        """Work on the original population that every variant's comparison reuses."""

    def baseline(self, ref: Reference) -> tuple[dict, dict]:
        return {}, {}

    def compare(self, ref: Reference, variant: Compared) -> tuple[dict, dict]:
        raise NotImplementedError

    def columns(self, results: dict) -> dict[str, str]:
        return {}

    def report(self, page, results: dict, arrays: dict) -> None:
        """Adds tables (`page.table`) and figures (`page.figure`) to the report."""


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
