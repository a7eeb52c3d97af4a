"""A run's workdir read back for exploration: its config, data, populations, results and test
predictions (`compax.load_run`, the public API in `compax/__init__.py`).

Nothing is computed again but the test logits: the original population is restored from its
checkpoints, each variant from its saved files (`compax/compress/store.py`), both only when the
stage that wrote them is up to date (`compax/stages.py`); a stale or missing stage is a one-line
error naming the command that makes it.
"""

import functools
import pathlib

import ml_collections
import numpy as np

from compax.analyses.reference import population_logits
from compax.compress import Compressed
from compax.compress.registry import Variant, run_recipe, variant_recipe
from compax.compress_population import recipe_context, restore_searches, restore_variant
from compax.errors import UserError
from compax.pipeline import Run
from compax.safe_files import read_json
from compax.stages import STAGES, StageRecords, read_config


class FinishedRun:
    """The outputs of the finished stages of the run in `workdir`, each read when first used.

    `config`: the run's config (config.json); `results`: results.json (schema in
    `compax/pipeline.py`); `variants`: the names of the compressed variants made; `dataset`: the
    run's data (`compax.data.Dataset`); `model`: the flax module; `original`: the trained
    population's variables (every leaf with a leading member axis); `variant(name)`: a compressed
    population; `logits(name)` and `predictions(name)`: its test outputs; `arrays(name)`: the
    arrays behind its figures (per analysis, as in results.json); `compress(recipe)`: the
    population compressed by another recipe.
    "baseline" names the original population wherever a variant's name is taken.
    """

    def __init__(self, workdir: str | pathlib.Path):
        self.workdir = pathlib.Path(workdir)
        recorded = read_config(self.workdir)
        if recorded is None:
            raise UserError(f"{self.workdir} holds no finished stage (no config.json): run"
                            f" python launch.py --config=configs/<name>.py --workdir={self.workdir}")
        self.config = ml_collections.ConfigDict(recorded)
        self._records = StageRecords(self.workdir, self.config)
        self._variants: dict[str, Variant] = {}
        self._logits: dict[str, np.ndarray] = {}

    @functools.cached_property
    def results(self) -> dict:
        """results.json: everything the run measured (schema in `compax/pipeline.py`)."""
        return read_json(self.workdir / "results.json", "results",
                         "run launch.py on the workdir again: it writes results.json")

    @property
    def variants(self) -> tuple[str, ...]:
        """The names of the compressed variants that the compress stage made."""
        return tuple(name for name in self.results["variants"] if name != "baseline")

    @functools.cached_property
    def _stages(self) -> Run:
        """The pipeline's view of the workdir (it loads the dataset); no progress bars."""
        config = self.config.copy_and_resolve_references()
        config.progress = False
        return Run(config, self.workdir)

    @property
    def dataset(self):
        """The run's train / val / test data (`compax.data.Dataset`)."""
        return self._stages.dataset

    @functools.cached_property
    def _trained(self):
        self._require("train")
        return self._stages.trained  # restored from the checkpoints: training is finished

    @property
    def model(self):
        """The flax module of the original population."""
        return self._trained.model

    @property
    def original(self) -> dict:
        """The trained population's variables (params, batch_stats), leading member axis."""
        return self._trained.variables

    def variant(self, name: str) -> Variant:
        """The population `name` ("baseline" or one of `variants`) as a `registry.Variant`: the
        module evaluating it and its `Compressed` (leading member axis), restored from its files;
        what was measured on it (its sparsity, ...) is in `results["variants"][name]`."""
        if name not in self._variants:
            if name == "baseline":
                self._variants[name] = Variant(self.model, Compressed(self.original, None))
            elif name not in self.variants:
                raise UserError(f"{self.workdir} has no variant {name!r}: its variants are"
                                f" baseline, {', '.join(self.variants) or '(none)'}")
            else:
                self._require("compress")
                steps = self._stages.recipes[name]
                self._variants[name] = restore_variant(
                    self.config, self.model, self.original, self.dataset, self._stages.chunk,
                    steps, self.workdir / "variants" / name)
        return self._variants[name]

    def logits(self, name: str) -> np.ndarray:
        """Test-set logits (members, test images, classes) of the population `name`, float32."""
        if name not in self._logits:
            variant = self.variant(name)
            self._logits[name] = population_logits(variant.model, variant.compressed, self.dataset,
                                                   self.config.eval_batch_size, self._stages.chunk)
        return self._logits[name]

    def predictions(self, name: str) -> np.ndarray:
        """Test-set predicted labels (members, test images) of the population `name`."""
        return self.logits(name).argmax(-1)

    def arrays(self, name: str) -> dict[str, dict[str, np.ndarray]]:
        """The analysis arrays of `name` that the report draws, per analysis as its results are
        ({analysis: {key: array}}, e.g. ["classes"]["class_accuracy_change_pp"]: the member mean
        of each class's change)."""
        self._require("analyse")
        arrays: dict[str, dict[str, np.ndarray]] = {}
        with np.load(self.workdir / "analysis" / "arrays.npz") as stored:
            for key in stored.files:
                variant, analysis, rest = key.rsplit(".", 2)  # variant names may hold dots
                if variant == name:
                    arrays.setdefault(analysis, {})[rest] = stored[key]
        return arrays

    def compress(self, recipe: str) -> Variant:
        """The original population compressed by `recipe` (a registered name or `name=recipe`
        text), with the run's compression settings and data; amount=searched takes the level the
        run searched. Nothing is saved."""
        _, steps = variant_recipe(recipe, self.config)
        ctx = recipe_context(self.config, self.model, self.original, self.dataset,
                             self._stages.chunk)
        restore_searches(ctx, self.results, self.config)
        return run_recipe(steps, self.model, self.original, ctx)

    def _require(self, stage: str) -> None:
        """Raises a UserError unless `stage` is up to date in the workdir."""
        if not self._records.is_current(stage):
            run = ",".join(STAGES[:STAGES.index(stage) + 1])
            raise UserError(f"stage {stage} of {self.workdir} is not up to date"
                            f" ({self._records.why_stale(stage)}): run launch.py with its config,"
                            f" --workdir={self.workdir} --config.stages={run}")
