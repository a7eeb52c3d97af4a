"""The knowledge-distillation study's table of one finished run (Markdown), read from results.json.

python experiments/distill_table.py runs/gtsrb_kd

Per variant: test accuracy (mean ± std over members), Δ (each member's accuracy minus its own
original's, mean ± std over members, pp, std with ddof 1), flipped test predictions (% of test
images whose prediction differs from the original's, mean over members), impacted classes of the
hooker analysis with Holm's correction (Welch / paired t, normalisation by subtraction), CIEs, and
the wall seconds of the variant's training steps (all members together).
"""

import json
import pathlib
import sys

import numpy as np


def row(name: str, variant: dict, baseline: dict) -> str:
    accuracy = np.asarray(variant["member_accuracy"])
    diff = 100 * (accuracy - np.asarray(baseline["member_accuracy"]))
    cie = variant["hooker"]["cie"]
    counts = cie.get("counts", {})
    impacted = "/".join(str(counts[t]["subtract"]["holm"]) if t in counts else "–"
                        for t in ("welch", "paired_t"))
    disagreement = variant["classes"]["disagreement"]
    training = sum(step.get("seconds", 0) for step in (variant.get("training") or {}).values())
    return " | ".join([
        name, f"{100 * accuracy.mean():.2f} ± {100 * accuracy.std(ddof=1):.2f}",
        f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f}",
        f"{100 * disagreement:.2f}" if disagreement is not None else "–",
        impacted, f"{cie['pies']:,}" if "pies" in cie else "–", f"{training:.0f}" if training else ""])


def main(workdir: str) -> None:
    variants = json.loads((pathlib.Path(workdir) / "results.json").read_text())["variants"]
    baseline = variants["baseline"]
    print("| variant | accuracy % | Δ pp | flipped % | impacted classes, Holm (Welch / paired t) |"
          " CIEs | training s |")
    print("|---|---|---|---|---|---|---|")
    for name, variant in variants.items():
        if name != "baseline":
            print("| " + row(name, variant, baseline) + " |")
    accuracy = 100 * np.asarray(baseline["member_accuracy"])
    print(f"\nbaseline: {accuracy.mean():.2f} ± {accuracy.std(ddof=1):.2f}% over {len(accuracy)} members")


if __name__ == "__main__":
    main(sys.argv[1])
