"""Table 1 of Schwaiger et al. (2022) for finished runs, next to the paper's row.

python experiments/table1.py runs/gtsrb_lenet runs/gtsrb_lenet_seeds1-2 runs/cifar10_lenet

Workdirs of the same model and dataset are pooled (their members together). Prints one Markdown
row per pair (`compax.paper.pooled_table1`): pruned share of all parameters (and of the weights),
uncompressed test accuracy and the differences in percentage points of pruned, w4a8, w8a8 and
pruned + w8a8, as mean ± std over members, with the paper's figures beside them. Then, for each
run of 3 or more members, Table 1's columns over its members (`compax.report.table1_seeds`: mean,
std, the central 95% of the members and the percentile of the paper's figure among them).
"""

import json
import pathlib
import sys

from compax.paper import pooled_table1
from compax.report import table1_seeds


def main(paths: list[str]) -> None:
    runs = [json.loads((pathlib.Path(p) / "results.json").read_text()) for p in paths]
    print(pooled_table1(runs))
    for path, results in zip(paths, runs, strict=True):
        seeds = table1_seeds(results)
        if seeds is not None:
            members = len(results["variants"]["baseline"]["member_accuracy"])
            print(f"\n{path}: Table 1 over the {members} members\n\n{seeds.markdown()}")


if __name__ == "__main__":
    main(sys.argv[1:])
