"""All six pairs of Table 1 (Schwaiger et al. 2022) in one command, with one combined Table 1.

python experiments/six_pairs.py --workdir=runs/six_pairs                 # paper size on accelerators
python experiments/six_pairs.py --workdir=runs/six_pairs --size=cpu --members=3
python experiments/six_pairs.py --workdir=/tmp/six_tiny --tiny           # minutes on a CPU, no files

Each (model, dataset) pair of the study (LeNet-5, SqueezeNet and ResNet-18 on GTSRB and CIFAR-10)
is one ordinary run of its config (`compax.config.study_config`: the study's size on an
accelerator, the CPU size on the CPU, or `--size`) with a population of `--members` seeds, every
variant and every analysis of that config, in `<workdir>/<dataset>_<model>`: the stages of a pair
that are up to date are skipped, so the command resumes after a kill. Then `<workdir>/table1.md`
holds the pooled Table 1 (`compax.paper.pooled_table1`: mean ± std over members, the paper's row
beside) and each pair's wall time, stage times and training images per second (of all members,
over the train stage's wall time, compilation and checkpoints included). The last line
printed is one JSON object with the same numbers.

`--tiny` checks the whole path in minutes: every pair on the embedded synthetic_signs data (no
files), narrowed models, one epoch, 2 members, the four Table 1 variants and the fast analyses.
"""

import json
import pathlib
import time

from absl import app, flags, logging

from compax.config import SIZES, study_config
from compax.paper import TABLE1, TABLE1_VARIANTS, pooled_table1

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the six runs and table1.md go.", required=True)
_MEMBERS = flags.DEFINE_integer("members", 3, "Seeds per pair (the population of each run).")
_SIZE = flags.DEFINE_enum("size", "auto", SIZES, "The configs' size (auto: paper on accelerators).")
_TINY = flags.DEFINE_boolean("tiny", False, "Synthetic data, one epoch, 2 members: a quick check.")
_PAIRS = flags.DEFINE_list("pairs", [f"{d}_{m}" for m, d in TABLE1], "Pairs to run, dataset_model.")


# Tiny mode's widths: the narrowest that keep every layer (ResNet-18 at 1/16: 4 to 32 channels).
TINY_WIDTHS = {"lenet5": 0.25, "squeezenet": 0.125, "resnet18": 0.0625}


def pair_config(dataset: str, model: str, size: str, members: int, tiny: bool):
    """The config of one pair: the study's config at `size` with `members` seeds (or tiny)."""
    c = study_config(dataset, model, size)
    c.population = members
    c.progress = False
    if tiny:
        c.dataset = "synthetic_signs"
        c.model_width = TINY_WIDTHS[model]
        c.eval_batch_size = 250  # also the batch the inference cost is timed on
        c.max_epochs, c.patience = 1, 1
        c.population = 2
        c.compress.variants = TABLE1_VARIANTS
        c.compress.sparsity_step = 0.1
        c.compress.calibration_images = 64
        c.analysis.analyses = "classes,calibration,hooker"
    return c


def run_pairs(workdir: pathlib.Path, pairs: list[str], size: str, members: int, tiny: bool) -> dict:
    """Runs every pair (resuming), writes table1.md and returns {pairs: {...}, table1, seconds}."""
    from compax import pipeline

    known = {f"{d}_{m}": (d, m) for m, d in TABLE1}
    unknown = [p for p in pairs if p not in known]
    if unknown:
        raise app.UsageError(f"unknown pair {unknown[0]!r}: use a comma-separated subset of"
                             f" {','.join(known)}")
    if members < 1:
        raise app.UsageError(f"--members must be >= 1, got {members}")
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs, timing = [], {}
    for pair in pairs:
        dataset, model = known[pair]
        config = pair_config(dataset, model, size, members, tiny)
        begun = time.perf_counter()
        logging.info("pair %s: %s x%d, width %s", pair, model, config.population, config.model_width)
        results = pipeline.run(config, workdir / pair)
        runs.append(results)
        stages = {s: round(r["wall_seconds"], 1) for s, r in results["stages"].items()}
        train = results.get("training") or {}
        timing[pair] = {"seconds": round(time.perf_counter() - begun, 1), "stages": stages,
                        "members": config.population, "width": config.model_width,
                        "epochs": results.get("epochs_trained"),
                        "train_images_per_second": round(
                            train["member_images"] / results["stages"]["train"]["wall_seconds"], 1)
                        if "member_images" in train else None}
    table = pooled_table1(runs)
    seconds = round(time.perf_counter() - started, 1)
    lines = [table, "", "| pair | members | width | epochs | wall s (this call) | stage s"
             " (when each last ran) | training images/s |", "|---|---|---|---|---|---|---|"]
    for pair, t in timing.items():
        lines.append(f"| {pair} | {t['members']} | {t['width']} | {t['epochs']} | {t['seconds']} |"
                     f" {', '.join(f'{s} {v}' for s, v in t['stages'].items())} |"
                     f" {t['train_images_per_second'] or '–'} |")
    (workdir / "table1.md").write_text("\n".join(lines) + "\n")
    return {"pairs": timing, "table1": table, "seconds": seconds}


def main(argv):
    del argv
    result = run_pairs(pathlib.Path(_WORKDIR.value), _PAIRS.value, _SIZE.value, _MEMBERS.value,
                       _TINY.value)
    print((pathlib.Path(_WORKDIR.value) / "table1.md").read_text())
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
