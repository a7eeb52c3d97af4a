"""What `launch.py` runs: the stages train -> compress -> analyse -> export -> report of one config.

The workdir holds:

    .lock                  held (flock) by the run using the workdir: one run at a time
    config.json            the config of the run whose stages results.json holds (written as
                           each stage finishes; a failed run never changes it)
    checkpoints/           orbax checkpoints of the training population (per epoch, newest 2),
                           each with its checksums and the metrics up to it
    metrics.jsonl          training metrics per epoch and member
    tensorboard/           the same scalars as event files (train/), and those of the training
                           steps of variants (<variant>/<step>/)
    variants/<name>/       orbax checkpoint of each compressed population, with its checksums and
                           a record of its inputs and test results (saved as each is made: a
                           rerun restores those that match, `compax/compress_population.py`)
    stages/<stage>.json    each stage's record (compax/stages.py) with the results it measured
    analysis/arrays.npz    the arrays behind the figures (written by `analyse`)
    analysis/parts/        each variant's analysis as it finishes, from which a rerun resumes
                           (`compax/analyse_population.py`)
    export/<name>/member_<i>.onnx  ONNX file of each member of the trained population ("baseline")
                           and of each variant, with export/compax_manifest.json (written by
                           `export`, compax/export_population.py)
    results.json           everything measured, merged from the stage records (schema below)
    report/                index.html, summary.md and the figures (written by `report`)

A rerun with the same workdir skips the stages whose config and inputs have not changed and runs
the others (`compax/stages.py`); `--config.stages=compress,analyse` runs a subset.

results.json:

    {"dataset": {...}, "model": {...}, "epochs_trained": int,
     "members": [{"seed", "best_epoch", "val_loss", "val_accuracy"}, ...],
     "training": {"member_images": training images seen, summed over the active members,
                  "seconds": the epochs' wall time before their checkpoint (train steps,
                  validation, metrics; summed over resumed runs), "member_images_per_second":
                  member_images per second of it, "train_step_seconds": the train steps' share;
                  the train stage's wall time (stages.train) adds compilation, checkpoints and the
                  test evaluation},
     "sparsity_searches": {criterion (a pruning step's settings without amount): {"criterion",
                           "levels", "val_accuracy" (population mean per level),
                           "baseline_val_accuracy", "tolerance_pp", "chosen"}} (when a recipe
                          prunes at amount=searched), "sparsity_search": the first of them,
     "inference": {variant: {"images_per_second", "speedup_vs_float32", "int8_images_per_second"}}
                  (timings of member 0 on this machine, compax/compress/cost.py),
     "variants": {"baseline" | <each name of compress.variants>: {
         "recipe": the steps with every setting (compax/compress/registry.py),
         "accuracy": mean test accuracy over members, "accuracy_std", "member_accuracy": [...],
         "accuracy_diff_pp": mean over members of (variant - baseline) in percentage points,
         "sparsity": {"amount", "fraction_of_weights", "fraction_of_params", "layers"} or None,
         "weight_bits", "activation_bits", "bytes" (as stored), "compression_ratio",
         "bytes_on_disk_population" (the saved population), "params", "macs" (per image),
         "int8": {"argmax_agreement", "max_logit_difference", "accuracy"} (8-bit activations),
         "export": {"onnx_bytes", "computed_bytes", "onnx_compression_ratio",
                    "ort_images_per_second", "ort_speedup", "ort_agreement" (per member),
                    "ort_max_logit_difference" (per member), "files"} (the export stage,
                    compax/export_population.py),
         ... what the steps report (e.g. "structure" of filter pruning), and each enabled
         analysis's results under its name, e.g. "classes": {"disagreement", ...}
         (compax/analyses/*.py)}},
     "skipped_analyses": {analysis: why} (default analyses that do not apply to the model),
     "stages": {stage: {"finished", "wall_seconds", "code_version", "machine"}}}
"""

import pathlib
import time

import ml_collections
import numpy as np
from absl import logging

from compax import registrations  # noqa: F401  (fills the registries the recipes name)
from compax import stages as stage_records
from compax.analyse_population import analyse_population
from compax.analyses import DataInfo, applicable_analyses
from compax.compress import Compressed, storage_bytes
from compax.compress.flops import model_macs
from compax.compress.registry import variant_recipes
from compax.compress_population import compress_population, restore_variant
from compax.data import Dataset, load_dataset
from compax.distributed import is_main_process
from compax.errors import UserError
from compax.export_population import export_population
from compax.member_vmap import loss_and_accuracy, make_predict, model_apply, population_chunk, take_members
from compax.models import count_params, get_model
from compax.report import write_report
from compax.safe_files import MANIFEST, lock_workdir, make_workdir, sha256_file
from compax.stages import STAGES, StageRecords, parse_stages, write_json_atomic
from compax.train import fit
from compax.train.checkpoint import recorded_config
from compax.train.loop import check_batch_size
from compax.train.memory import check_population_fits
from compax.validate import validate_config

# Training keys that may change between a run and its resumption: training continues from the
# checkpoints (and the later stages run again).
EXTENDABLE_KEYS = ("max_epochs",)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Creates the workdir; refuses one whose population was trained with another config.

    The population's config is the one in config.json, or, when a run was killed before it
    finished its first stage, the one in the newest checkpoint. Nothing is written here:
    config.json is written as each stage finishes (compax/stages.py), so a run that fails never
    changes it.
    """
    make_workdir(workdir)
    recorded, source = stage_records.read_config(workdir), workdir / "config.json"
    if recorded is None:
        recorded, source = recorded_config(workdir / "checkpoints"), workdir / "checkpoints"
    if recorded is None:
        return
    wanted, recorded = (
        {k: v for k, v in stage_records.stage_config(ml_collections.ConfigDict(c), "train").items()
         if k not in EXTENDABLE_KEYS} for c in (config.to_dict(), recorded))
    changed = sorted(k for k in wanted.keys() | recorded.keys()
                     if wanted.get(k) != recorded.get(k))
    if changed:
        k = changed[0]
        raise UserError(f"workdir {workdir} holds a population trained with {k}="
                        f"{recorded.get(k)!r}, not {wanted.get(k)!r} ({source}): use a new"
                        " --workdir or delete the old one")


def load_checked_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The dataset of `config`, after the checks of the values that depend on it: the batch
    against the training images, the population against the free memory, the analyses against
    the model and the data (one the user named that cannot apply is a UserError)."""
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, split_seed=config.split_seed,
                           val_fraction=config.val_fraction, download=config.download)
    check_batch_size(config.batch_size, len(dataset.train))
    model = get_model(config.model, dataset.num_classes, config.model_width)
    check_population_fits(model, config.population)
    applicable_analyses(config.analysis, model, DataInfo.of(dataset))
    return dataset


class Run:
    """The stages of one config in one workdir, and what they pass on to each other; `dataset`
    is loaded (`load_checked_dataset`) where not given."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path,
                 dataset: Dataset | None = None, recipes: dict | None = None):
        self.config, self.workdir = config, workdir
        # {variant: steps}: the recipes of `compress.variants`, parsed once (`validate_config`).
        self.recipes = (variant_recipes(config.compress.variants, config) if recipes is None
                        else recipes)
        self.dataset = load_checked_dataset(config) if dataset is None else dataset
        logging.info("%s: %d train / %d val / %d test images, %d classes", self.dataset.name,
                     len(self.dataset.train), len(self.dataset.val), len(self.dataset.test),
                     self.dataset.num_classes)
        self.records = StageRecords(workdir, config)
        self._trained = None

    @property
    def trained(self):
        """The trained population (restored from the checkpoints when training is finished)."""
        if self._trained is None:
            self._trained = fit(self.config, self.dataset, self.workdir, progress=self.config.progress)
        return self._trained

    @property
    def chunk(self) -> int:
        return population_chunk(self.config.population_chunk, self.config.population)

    # The stages. Each returns (results for results.json, output paths relative to the workdir).

    def train(self) -> tuple[dict, list[str]]:
        trained = self.trained
        predict = make_predict(model_apply(trained.model), self.dataset.mean, self.dataset.std,
                               self.config.eval_batch_size, self.chunk)
        _, accuracy = loss_and_accuracy(predict(trained.variables, self.dataset.test.images),
                                        self.dataset.test.labels)
        first = take_members(trained.variables, 0)
        params = count_params(first["params"])
        state = trained.state
        dataset = self.dataset
        results = {
            "dataset": {"name": dataset.name, "train": len(dataset.train), "val": len(dataset.val),
                        "test": len(dataset.test), "classes": dataset.num_classes},
            "model": {"name": self.config.model, "width": self.config.model_width, "params": params},
            "epochs_trained": int(state.epoch),
            "training": training_throughput(trained.history, len(dataset.train), self.config.batch_size),
            "members": [
                {"seed": int(seed), "best_epoch": int(state.best_epoch[i]),
                 "val_loss": float(state.best_val_loss[i]),
                 "val_accuracy": next(float(h["val_accuracy"][i]) for h in trained.history
                                      if h["epoch"] == int(state.best_epoch[i]))}
                for i, seed in enumerate(trained.seeds)],
            "variants": {"baseline": {
                "params": params, "macs": model_macs(model_apply(trained.model), first,
                                                     dataset.test.images.shape[1:]),
                "accuracy": float(np.mean(accuracy)),
                "accuracy_std": float(np.std(accuracy)), "member_accuracy": accuracy.tolist(),
                "sparsity": None, "weight_bits": 32, "activation_bits": 32,
                "bytes": int(storage_bytes(first)), "compression_ratio": 1.0}},
        }
        logging.info("baseline: test accuracy %.4f (std %.4f over %d members)",
                     np.mean(accuracy), np.std(accuracy), len(trained.seeds))
        return results, ["checkpoints", "metrics.jsonl"]

    def compress(self) -> tuple[dict, list[str]]:
        trained = self.trained
        made = compress_population(self.config, trained.model, trained.variables, self.dataset,
                                   self.chunk, self.recipes, log_dir=self.workdir / "tensorboard",
                                   checkpoint_dir=self.workdir / "step_checkpoints",
                                   save_dir=self.workdir / "variants")
        variants = made["variants"]
        baseline = self.records.read("train")["results"]["variants"]["baseline"]
        for name in made["populations"]:
            path = self.workdir / "variants" / name
            variant = variants[name]
            variant["bytes_on_disk_population"] = sum(  # orbax's files, without compax's manifest
                f.stat().st_size for f in path.rglob("*")
                if f.is_file() and f.name != "compax_manifest.json")
            variant["accuracy_diff_pp"] = float(100 * np.mean(
                np.asarray(variant["member_accuracy"]) - np.asarray(baseline["member_accuracy"])))
            logging.info("%s: test accuracy %.4f (%+.2f pp), %d bytes (%.2fx smaller)", name,
                         variant["accuracy"], variant["accuracy_diff_pp"], variant["bytes"],
                         variant["compression_ratio"])
        results = {"variants": variants, "inference": made["inference"]}
        for key in ("sparsity_search", "sparsity_searches"):
            if key in made:
                results[key] = made[key]
        return results, [f"variants/{name}" for name in made["populations"]]

    def load_populations(self) -> dict:
        """{variant: (module, compressed population, design)} as the compress stage saved them;
        design: "paired" or "independent" (`analyses.Compared.design`)."""
        trained, loaded = self.trained, {}
        for name, steps in self.recipes.items():
            variant = restore_variant(self.config, trained.model, trained.variables, self.dataset,
                                      self.chunk, steps, self.workdir / "variants" / name)
            loaded[name] = (variant.model, variant.compressed, variant.info.get("design", "paired"))
        return loaded

    def analyse(self) -> tuple[dict, list[str]]:
        trained = self.trained
        original = Compressed(trained.variables, None)  # the population, uncompressed
        loaded = self.load_populations()
        summary, arrays = analyse_population(
            self.config, self.dataset, trained.model, original,
            {name: model for name, (model, _, _) in loaded.items()},
            {name: population for name, (_, population, _) in loaded.items()}, self.chunk,
            {name: design for name, (_, _, design) in loaded.items()},
            parts_dir=self.workdir / "analysis" / "parts", inputs=self.analysis_inputs(loaded))
        path = self.workdir / "analysis" / "arrays.npz"
        if is_main_process():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, **arrays)
            tmp.replace(path)
        return summary, ["analysis/arrays.npz"]

    def analysis_inputs(self, loaded: dict) -> dict:
        """What the analysis of the original population and of each variant is computed from
        (`analyse_population`'s parts): the training's fingerprint and the analysis settings,
        and for a variant its recipe, design and saved files (their checksums' SHA-256)."""
        common = {"train": self.records.read("train")["fingerprint"],
                  **stage_records.stage_config(self.config, "analyse"),
                  "eval_batch_size": self.config.eval_batch_size}
        compressed = self.records.read("compress")["results"]["variants"]
        return {"baseline": common, **{
            name: {**common, "recipe": compressed[name]["recipe"], "design": design,
                   "files": sha256_file(self.workdir / "variants" / name / MANIFEST)}
            for name, (_, _, design) in loaded.items()}}

    def export(self) -> tuple[dict, list[str]]:
        trained = self.trained
        loaded = self.load_populations()
        exported = export_population(
            self.config, trained.model, Compressed(trained.variables, None),
            {name: (model, population) for name, (model, population, _) in loaded.items()},
            self.dataset, self.chunk, self.workdir / "export")
        return {"variants": {name: {"export": e} for name, e in exported.items()}}, ["export"]

    def report(self) -> tuple[dict, list[str]]:
        if not is_main_process():
            return {}, []
        results = self.merged_results()
        with np.load(self.workdir / "analysis" / "arrays.npz") as arrays:
            outputs = write_report(self.workdir / "report", self.config, results, dict(arrays),
                                   self.dataset)
        return {}, outputs

    def merged_results(self) -> dict:
        """results.json: the results of every stage with a record, merged."""
        merged = {"variants": {}, "stages": {}}
        for stage in STAGES:
            record = self.records.read(stage)
            if record is None:
                continue
            for key, value in record.get("results", {}).items():
                if key == "variants":
                    for name, fields in value.items():
                        merged["variants"].setdefault(name, {}).update(fields)
                else:
                    merged[key] = value
            merged["stages"][stage] = {k: record[k] for k in
                                       ("finished", "wall_seconds", "code_version", "machine")}
        return merged


def training_throughput(history: list[dict], train_images: int, batch_size: int) -> dict:
    """The whole training's cost from its metrics: wall seconds of the epochs, and training images
    of the active members (steps x batch size each) per second of them; with `train_step_seconds`
    where the records hold it (the rest is validation, checkpoints and bookkeeping)."""
    seconds = sum(record["seconds"] for record in history)
    images = sum(sum(record["active"]) for record in history) * (train_images // batch_size) * batch_size
    result = {"member_images": images, "seconds": round(seconds, 1),
              "member_images_per_second": round(images / seconds, 1) if seconds else None}
    if history and all("train_seconds" in record for record in history):
        result["train_step_seconds"] = round(sum(r["train_seconds"] for r in history), 1)
    return result


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        recipes: dict | None = None) -> dict:
    """Runs the stages of `config` in `workdir` (skipping those up to date); returns results.json.

    `recipes`: what `validate_config(config)` returned, when the caller validated the config
    already (launch.py, before it imports jax); None: validated here. Either way once per run.
    """
    workdir = pathlib.Path(workdir)
    if recipes is None:
        recipes = validate_config(config)  # every value and name, before anything touches the workdir
    wanted = parse_stages(config.stages)
    dataset = load_checked_dataset(config)  # and the values that need it, before the workdir too
    with lock_workdir(workdir, is_main_process()):  # one run per workdir at a time
        return _run_stages(config, workdir, wanted, dataset, recipes)


def _run_stages(config: ml_collections.ConfigDict, workdir: pathlib.Path, wanted,
                dataset: Dataset, recipes: dict) -> dict:
    """The stages `wanted` of `config` on `dataset` in `workdir`, which this process has locked."""
    prepare_workdir(config, workdir)
    pipeline = Run(config, workdir, dataset, recipes)
    records = pipeline.records
    for stage in STAGES:
        if stage not in wanted:
            continue
        missing = next((s for s in records.inputs(stage)
                        if s not in wanted and not records.is_current(s)), None)
        if missing:
            needed = ",".join(STAGES[STAGES.index(missing):STAGES.index(stage) + 1])
            raise UserError(f"stage {stage} needs the outputs of stage {missing}, which is"
                            f" {records.why_stale(missing)}: run --config.stages={needed}")
        if records.is_current(stage):
            logging.info("stage %s: up to date (finished %s), skipped", stage,
                         records.read(stage)["finished"])
            continue
        logging.info("stage %s: running (%s)", stage, records.why_stale(stage))
        started = time.time()
        results, outputs = getattr(pipeline, stage)()
        records.finish(stage, started, outputs, results=results)
        if is_main_process():
            write_json_atomic(workdir / "results.json", pipeline.merged_results())
        logging.info("stage %s: done in %.0f s", stage, time.time() - started)
    results = pipeline.merged_results()
    if is_main_process():
        write_json_atomic(workdir / "results.json", results)
    return results
