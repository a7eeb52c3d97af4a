"""Table 1 of Schwaiger, Schwienbacher & Roscher, "Beyond Test Accuracy: The Effects of Model
Compression on CNNs" (SafeAI 2022), as data, to set every run next to the study's row.

Accuracy of the uncompressed model in %, the pruned share in % (of all parameters, biases
included: amount 0.55 on LeNet-5/GTSRB prunes round(0.55 x 64,542) weights of 64,811 parameters,
54.77%, printed 54.8%)
and the change of each compressed variant in percentage points, as printed in the paper
(../shared/paper_table1.md).
"""

# (model, dataset) -> row; variant names are compax's.
TABLE1 = {
    ("lenet5", "gtsrb"): {"pruned_percent": 54.8, "accuracy": 92.3,
                          "diff_pp": {"pruned": -0.4, "w4a8": -0.4, "w8a8": -0.2, "pruned_w8a8": -0.7}},
    ("lenet5", "cifar10"): {"pruned_percent": 39.8, "accuracy": 74.8,
                            "diff_pp": {"pruned": -0.5, "w4a8": -7.9, "w8a8": -0.1,
                                        "pruned_w8a8": -0.6}},
    ("squeezenet", "gtsrb"): {"pruned_percent": 49.4, "accuracy": 93.0,
                              "diff_pp": {"pruned": -0.8, "w4a8": -2.2, "w8a8": -0.2,
                                          "pruned_w8a8": -0.8}},
    ("squeezenet", "cifar10"): {"pruned_percent": 49.4, "accuracy": 84.5,
                                "diff_pp": {"pruned": -0.4, "w4a8": -4.0, "w8a8": 0.0,
                                            "pruned_w8a8": -0.4}},
    ("resnet18", "gtsrb"): {"pruned_percent": 67.4, "accuracy": 95.4,
                            "diff_pp": {"pruned": 0.0, "w4a8": -0.2, "w8a8": -0.1, "pruned_w8a8": -0.1}},
    ("resnet18", "cifar10"): {"pruned_percent": 72.4, "accuracy": 86.5,
                              "diff_pp": {"pruned": 0.0, "w4a8": -0.9, "w8a8": -0.1,
                                          "pruned_w8a8": -0.2}},
}
TABLE1_VARIANTS = ("pruned", "w4a8", "w8a8", "pruned_w8a8")


def table1_row(model: str, dataset: str) -> dict | None:
    """The study's row for a model and dataset, or None where the study has none."""
    return TABLE1.get((model, dataset))


def seed_distribution(member_values, paper_value: float | None) -> dict | None:
    """Where the study's single figure falls among a population's per-member values.

    Returns {mean, std (ddof 1), low, high: the central 95% of the members' values (the 2.5th and
    97.5th percentiles, linear interpolation), percentile: the share of members at or below the
    paper's figure, ties counted half (`scipy.stats.percentileofscore(kind="mean")`), in %}; None
    with fewer than 3 members. Seeds of one setting differ by about 1 pp in every Δ (session 1), so
    a paper figure inside [low, high] is within seed noise.
    """
    import numpy as np
    from scipy import stats

    values = np.asarray(member_values, np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 3:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)), "low": float(low),
            "high": float(high), "members": len(values),
            "percentile": None if paper_value is None
            else float(stats.percentileofscore(values, paper_value, kind="mean"))}


def pooled_table1(runs: list[dict]) -> str:
    """Table 1 in Markdown for finished runs (their results.json), next to the study's rows.

    Runs of the same model and dataset are pooled (their members together). One row per pair:
    width, members, pruned share of all parameters (of the weights), uncompressed test accuracy and
    the differences of pruned, w4a8, w8a8 and pruned + w8a8 in percentage points, as mean ± std
    (ddof 0) over the members, each member against its own original; the paper's row beside.
    """
    import numpy as np

    pairs: dict = {}
    for results in runs:
        key = (results["model"]["name"], results["dataset"]["name"])
        row = pairs.setdefault(key, {"acc": {}, "params": [], "weights": [], "width": set()})
        row["width"].add(results["model"]["width"])
        for name, variant in results["variants"].items():
            row["acc"].setdefault(name, []).extend(variant["member_accuracy"])
        sparsity = (results["variants"].get("pruned") or {}).get("sparsity") or {}
        if "fraction_of_params" in sparsity:
            row["params"].append(100 * sparsity["fraction_of_params"])
            row["weights"].append(100 * sparsity["fraction_of_weights"])

    def spread(values) -> str:
        values = np.asarray(values)
        return f"{values.mean():+.2f} ± {values.std():.2f}" if values.size > 1 else f"{values[0]:+.2f}"

    lines = ["| model | dataset | width | members | % pruned (of weights) | accuracy % "
             "| pruned Δ | w4a8 Δ | w8a8 Δ | pruned+w8a8 Δ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, dataset), row in pairs.items():
        base = 100 * np.asarray(row["acc"]["baseline"])
        diffs = [spread(100 * np.asarray(row["acc"][v]) - base) if v in row["acc"] else "–"
                 for v in TABLE1_VARIANTS]
        pruned = (f"{np.mean(row['params']):.1f} ({np.mean(row['weights']):.1f})" if row["params"]
                  else "–")
        width = ",".join(str(w) for w in sorted(row["width"]))
        lines.append(f"| {model} | {dataset} | {width} | {base.size} | {pruned} |"
                     f" {base.mean():.2f} ± {base.std():.2f} | " + " | ".join(diffs) + " |")
        paper = table1_row(model, dataset)
        if paper:
            lines.append(f"| *paper* | | 1.0 | 1 | {paper['pruned_percent']} | {paper['accuracy']} | "
                         + " | ".join(f"{paper['diff_pp'][v]:+.1f}" for v in TABLE1_VARIANTS) + " |")
    return "\n".join(lines)
