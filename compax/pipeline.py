"""What `launch.py` runs: load the data, train the population, evaluate it, write results.json.

The workdir holds `config.json` (the config the run was started with), `checkpoints/` (orbax, per
epoch), `metrics.jsonl` (per epoch and member) and `results.json`:

    {"dataset": {...}, "model": {...}, "seeds": [...],
     "variants": {"baseline": {"params": int, "accuracy": mean test accuracy, "accuracy_std": ...,
                               "members": [{"seed", "accuracy", "val_accuracy", "val_loss",
                                            "best_epoch"}, ...]}}}
"""

import json
import os
import pathlib
import tempfile

import ml_collections
import numpy as np
from absl import logging

from compax.data import load_dataset
from compax.errors import UserError
from compax.models import count_params
from compax.train import fit, loss_and_accuracy, make_predict
from compax.train.population import population_chunk

# Keys that may change between a run and its resumption without invalidating its checkpoints.
RESUMABLE_KEYS = ("progress", "max_epochs", "eval_batch_size", "data_dir", "download",
                  "population_chunk")


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
    wanted = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_KEYS}
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
    """Trains and evaluates the population of `config` in `workdir`; returns results.json's content."""
    workdir = pathlib.Path(workdir)
    prepare_workdir(config, workdir)
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, split_seed=config.split_seed,
                           val_fraction=config.val_fraction, download=config.download)
    logging.info("%s: %d train / %d val / %d test images, %d classes", dataset.name,
                 len(dataset.train), len(dataset.val), len(dataset.test), dataset.num_classes)
    trained = fit(config, dataset, workdir, progress=config.progress)
    chunk = population_chunk(config.population_chunk, len(trained.seeds))
    predict = make_predict(trained.model, dataset.mean, dataset.std, config.eval_batch_size, chunk)
    _, test_accuracy = loss_and_accuracy(predict(trained.variables, dataset.test.images),
                                         dataset.test.labels)
    state = trained.state
    params = count_params(trained.variables["params"]) // len(trained.seeds)
    members = [
        {"seed": int(seed), "accuracy": float(test_accuracy[i]),
         "val_loss": float(state.best_val_loss[i]), "best_epoch": int(state.best_epoch[i]),
         "val_accuracy": next(float(h["val_accuracy"][i]) for h in trained.history
                              if h["epoch"] == int(state.best_epoch[i]))}
        for i, seed in enumerate(trained.seeds)]
    results = {
        "dataset": {"name": dataset.name, "train": len(dataset.train), "val": len(dataset.val),
                    "test": len(dataset.test), "classes": dataset.num_classes},
        "model": {"name": config.model, "width": config.model_width, "params": params},
        "seeds": [int(s) for s in trained.seeds],
        "epochs_trained": int(state.epoch),
        "variants": {"baseline": {
            "params": params,
            "accuracy": float(np.mean(test_accuracy)),
            "accuracy_std": float(np.std(test_accuracy)),
            "members": members,
        }},
    }
    write_json_atomic(workdir / "results.json", results)
    logging.info("baseline test accuracy %.4f (std %.4f over %d members)",
                 results["variants"]["baseline"]["accuracy"],
                 results["variants"]["baseline"]["accuracy_std"], len(members))
    return results
