"""Table 1 of Schwaiger et al. (2022) for finished runs, next to the paper's row.

python experiments/table1.py runs/gtsrb_lenet runs/gtsrb_lenet_seeds1-2 runs/cifar10_lenet

Workdirs of the same model and dataset are pooled (their members together). Prints one Markdown
row per pair (`compax.paper.pooled_table1`): pruned share of all parameters (and of the weights),
uncompressed test accuracy and the differences in percentage points of pruned, w4a8, w8a8 and
pruned + w8a8, as mean ± std over members, with the paper's figures beside them.
"""

import json
import pathlib
import sys

from compax.paper import pooled_table1


def main(paths: list[str]) -> None:
    print(pooled_table1([json.loads((pathlib.Path(p) / "results.json").read_text()) for p in paths]))


if __name__ == "__main__":
    main(sys.argv[1:])
