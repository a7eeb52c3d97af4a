"""What `launch.py` runs: load the data, train the population, compress it, evaluate every variant.

The workdir holds `config.json` (the config the run was started with), `checkpoints/` (orbax, per
epoch), `metrics.jsonl` (per epoch and member) and `results.json`:

    {"dataset": {...}, "model": {...}, "epochs_trained": int,
     "members": [{"seed", "best_epoch", "val_loss", "val_accuracy"}, ...],
     "sparsity_search": {"levels", "val_accuracy" (population mean per level),
                         "baseline_val_accuracy", "tolerance_pp", "chosen"},
     "variants": {"baseline" | "pruned" | "w8a8" | "w4a8" | "pruned_w8a8" | "float16" |
                  "bfloat16" | "dynamic_int8": {
         "accuracy": mean test accuracy over members, "accuracy_std", "member_accuracy": [...],
         "accuracy_diff_pp": mean over members of (variant - baseline) in percentage points,
         "sparsity": {"amount", "fraction_of_weights", "fraction_of_params", "layers"} or None,
         "weight_bits", "activation_bits", "bytes" (as stored), "compression_ratio"}}}
"""

import json
import os
import pathlib
import tempfile

import ml_collections
import numpy as np
from absl import logging

from compax.compress import storage_bytes
from compax.compress_population import compress_population
from compax.data import load_dataset
from compax.errors import UserError
from compax.models import count_params
from compax.train import fit, loss_and_accuracy, make_predict, model_apply
from compax.train.population import population_chunk, take_members

# Keys that may change between a run and its resumption without invalidating its training
# checkpoints (compression and evaluation are recomputed from the trained weights).
RESUMABLE_KEYS = ("progress", "max_epochs", "eval_batch_size", "data_dir", "download",
                  "population_chunk", "compress")


def write_json_atomic(path: pathlib.Path, payload: dict) -> None:
    """Writes JSON to a temporary file beside `path`, then renames it, so a kill leaves no half file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=1)
    os.replace(f.name, path)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Creates the workdir and records the config; refuses a workdir of a different run."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"workdir {workdir} is not writable ({e.strerror}): pass another"
                        " --workdir") from e
    as_json = json.loads(json.dumps(config.to_dict()))  # tuples become lists, as when read back
    wanted = {k: v for k, v in as_json.items() if k not in RESUMABLE_KEYS}
    recorded_path = workdir / "config.json"
    if recorded_path.exists():
        recorded = {k: v for k, v in json.loads(recorded_path.read_text()).items()
                    if k not in RESUMABLE_KEYS}
        changed = sorted(k for k in wanted.keys() | recorded.keys()
                         if wanted.get(k) != recorded.get(k))
        if changed:
            k = changed[0]
            raise UserError(f"workdir {workdir} holds a run with {k}={recorded.get(k)!r}, not"
                            f" {wanted.get(k)!r}: use a new --workdir or delete the old one")
    write_json_atomic(recorded_path, config.to_dict())


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains, compresses and evaluates the population of `config` in `workdir`; returns results."""
    workdir = pathlib.Path(workdir)
    prepare_workdir(config, workdir)
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, split_seed=config.split_seed,
                           val_fraction=config.val_fraction, download=config.download)
    logging.info("%s: %d train / %d val / %d test images, %d classes", dataset.name,
                 len(dataset.train), len(dataset.val), len(dataset.test), dataset.num_classes)
    trained = fit(config, dataset, workdir, progress=config.progress)
    chunk = population_chunk(config.population_chunk, len(trained.seeds))
    predict = make_predict(model_apply(trained.model), dataset.mean, dataset.std,
                           config.eval_batch_size, chunk)
    _, test_accuracy = loss_and_accuracy(predict(trained.variables, dataset.test.images),
                                         dataset.test.labels)
    state = trained.state
    first = take_members(trained.variables, 0)
    params = count_params(first["params"])
    baseline = {
        "params": params,
        "accuracy": float(np.mean(test_accuracy)),
        "accuracy_std": float(np.std(test_accuracy)),
        "member_accuracy": test_accuracy.tolist(),
        "sparsity": None,
        "weight_bits": 32,
        "activation_bits": 32,
        "bytes": int(storage_bytes(first)),
        "compression_ratio": 1.0,
    }
    results = {
        "dataset": {"name": dataset.name, "train": len(dataset.train), "val": len(dataset.val),
                    "test": len(dataset.test), "classes": dataset.num_classes},
        "model": {"name": config.model, "width": config.model_width, "params": params},
        "epochs_trained": int(state.epoch),
        "members": [
            {"seed": int(seed), "best_epoch": int(state.best_epoch[i]),
             "val_loss": float(state.best_val_loss[i]),
             "val_accuracy": next(float(h["val_accuracy"][i]) for h in trained.history
                                  if h["epoch"] == int(state.best_epoch[i]))}
            for i, seed in enumerate(trained.seeds)],
        "variants": {"baseline": baseline},
    }
    logging.info("baseline: test accuracy %.4f (std %.4f over %d members)", baseline["accuracy"],
                 baseline["accuracy_std"], len(trained.seeds))
    if config.compress.variants:
        compressed = compress_population(config, trained.model, trained.variables, dataset, chunk)
        results["sparsity_search"] = compressed["sparsity_search"]
        for name, variant in compressed["variants"].items():
            variant["accuracy_diff_pp"] = float(
                100 * np.mean(np.asarray(variant["member_accuracy"]) - test_accuracy))
            results["variants"][name] = variant
            logging.info("%s: test accuracy %.4f (%+.2f pp), %d bytes (%.2fx smaller)", name,
                         variant["accuracy"], variant["accuracy_diff_pp"], variant["bytes"],
                         variant["compression_ratio"])
    write_json_atomic(workdir / "results.json", results)
    return results
