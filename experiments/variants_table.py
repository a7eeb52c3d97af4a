"""The variants of a finished run side by side, as RESULTS.md shows them (Markdown).

python experiments/variants_table.py runs/cifar10_lenet_p3

Per variant: test accuracy (mean ± std over members), Δ (mean of each member's difference to its
own original, pp), weight sparsity, flipped test predictions (%), impacted classes (the hooker
analysis: Welch with the run's normalisation and correction; paired t and Wilcoxon where the
variant is paired), CIEs, the design, and the wall seconds of its training steps (all members).
"""

import json
import pathlib
import sys


def row(name: str, v: dict) -> str:
    sparsity = (v.get("sparsity") or {}).get("fraction_of_weights")
    cie = (v.get("hooker") or {}).get("cie") or {}
    paired = cie.get("paired_tests") or {}
    tests = "/".join(str(t["count"]) for t in [cie, *paired.values()] if "count" in t) or "–"
    training = sum(step.get("seconds", 0) for step in (v.get("training") or {}).values())
    disagreement = (v.get("classes") or {}).get("disagreement")
    return " | ".join([
        name, f"{100 * v['accuracy']:.2f} ± {100 * v.get('accuracy_std', 0):.2f}",
        f"{v['accuracy_diff_pp']:+.2f}" if "accuracy_diff_pp" in v else "",
        f"{100 * sparsity:.0f}%" if sparsity else "",
        f"{100 * disagreement:.2f}" if disagreement is not None else "",
        tests, f"{cie['pies']:,}" if "pies" in cie else "–", cie.get("design", ""),
        f"{training:.0f}" if training else ""])


def main(workdir: str) -> None:
    results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    print("| variant | accuracy % | Δ pp | weight sparsity | flipped % | impacted classes"
          " (Welch / paired t / Wilcoxon) | CIEs | design | training s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, v in results["variants"].items():
        print("| " + row(name, v) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
