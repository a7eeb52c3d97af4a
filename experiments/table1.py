"""Table 1 of Schwaiger et al. (2022) for finished runs, next to the paper's row.

python experiments/table1.py runs/gtsrb_lenet runs/gtsrb_lenet_seeds1-2 runs/cifar10_lenet

Workdirs of the same model and dataset are pooled (their members together). Prints one Markdown
row per pair: pruned share of all parameters (and of the weights), uncompressed test accuracy and
the differences in percentage points of pruned, w4a8, w8a8 and pruned + w8a8, as mean ± std over
members, with the paper's figures beside them.
"""

import json
import pathlib
import sys

import numpy as np

from compax.paper import TABLE1_VARIANTS, table1_row


def pooled(workdirs: list[pathlib.Path]) -> dict:
    """Per (model, dataset): member accuracies of every variant and the pruned shares."""
    rows = {}
    for workdir in workdirs:
        results = json.loads((workdir / "results.json").read_text())
        key = (results["model"]["name"], results["dataset"]["name"])
        row = rows.setdefault(key, {"acc": {}, "params": [], "weights": [], "width": set()})
        row["width"].add(results["model"]["width"])
        for name, variant in results["variants"].items():
            row["acc"].setdefault(name, []).extend(variant["member_accuracy"])
        sparsity = results["variants"]["pruned"]["sparsity"]
        row["params"].append(100 * sparsity["fraction_of_params"])
        row["weights"].append(100 * sparsity["fraction_of_weights"])
    return rows


def fmt(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():+.2f} ± {values.std():.2f}" if values.size > 1 else f"{values[0]:+.2f}"


def main(paths: list[str]) -> None:
    print("| model | dataset | width | members | % pruned (of weights) | accuracy % "
          "| pruned Δ | w4a8 Δ | w8a8 Δ | pruned+w8a8 Δ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (model, dataset), row in pooled([pathlib.Path(p) for p in paths]).items():
        base = 100 * np.asarray(row["acc"]["baseline"])
        diffs = [fmt(100 * np.asarray(row["acc"][v]) - base) for v in TABLE1_VARIANTS]
        paper = table1_row(model, dataset)
        width = ",".join(str(w) for w in sorted(row["width"]))
        print(f"| {model} | {dataset} | {width} | {base.size} | {np.mean(row['params']):.1f}"
              f" ({np.mean(row['weights']):.1f}) | {base.mean():.2f} ± {base.std():.2f} | "
              + " | ".join(diffs) + " |")
        if paper:
            print(f"| *paper* | | 1.0 | 1 | {paper['pruned_percent']} | {paper['accuracy']} | "
                  + " | ".join(f"{paper['diff_pp'][v]:+.1f}" for v in TABLE1_VARIANTS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
