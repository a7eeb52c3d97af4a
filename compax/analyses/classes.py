"""Class-level analysis (Schwaiger et al. 2022; Hooker thesis): accuracy, confusion, flips, F1.

Per member, against the original member of the same seed: the share of test samples predicted
differently (flips), per-class accuracy changes and row-normalised confusion-matrix changes in
percentage points, and the classification report (per-class precision, recall and F1, macro F1);
then, over the member means, the largest changes and the Spearman test of class frequency in the
training set against the class accuracy change (`compax.measure.classes`). A variant trained from
seeds of its own (e.g. gmp from initialisation) is compared with the original member of the same
index, so its flips include what two seeds already disagree on: the original population's
`seed_disagreement` (mean over m of the share of test samples where member m and member m+1,
cyclically, predict differently) is that floor.
"""

import numpy as np

from compax import plots
from compax.analyses.base import Analysis, fmt, register_analysis


@register_analysis
class ClassLevel(Analysis):
    name = "classes"
    title = "Class level"

    def _report(self, ref, preds: np.ndarray) -> dict:
        """Per-member classification reports (P, classes) of `preds` (P, N)."""
        import jax
        import jax.numpy as jnp

        from compax.measure import classes

        labels = jnp.asarray(ref.labels)
        return jax.vmap(lambda p: classes.class_report(labels, p, ref.num_classes))(
            jnp.asarray(preds))

    def prepare(self, ref) -> None:
        self.original = self._report(ref, ref.preds)

    def baseline(self, ref):
        from compax.analyses.reference import member_mean

        arrays = {f"class_{k}": np.asarray(self.original[k]).mean(0)
                  for k in ("precision", "recall", "f1")}
        results = {"macro_f1": member_mean(self.original["macro_f1"])}
        if ref.members >= 2:  # what an independently seeded variant flips with no compression
            results["seed_disagreement"] = float(np.mean(ref.preds != np.roll(ref.preds, 1, 0)))
        return results, arrays

    def compare(self, ref, variant):
        import jax
        import jax.numpy as jnp

        from compax.analyses.reference import member_mean
        from compax.measure import classes

        labels = jnp.asarray(ref.labels)
        compared = jax.vmap(lambda a, b: classes.compare_classes(labels, a, b, ref.num_classes))(
            jnp.asarray(ref.preds), jnp.asarray(variant.preds))
        report = self._report(ref, variant.preds)
        change = np.asarray(compared["confusion_change_pp"]).mean(0)
        class_change = np.asarray(compared["class_accuracy_change_pp"]).mean(0)
        counts = np.bincount(ref.dataset.train.labels, minlength=ref.num_classes)
        results = {
            "disagreement": member_mean(compared["disagreement"]),
            "flips": {k: member_mean(compared[k]) for k in
                      ("flipped", "right_before", "right_after", "wrong_both")},
            "max_class_acc_change_pp": member_mean(compared["max_class_acc_change_pp"]),
            "max_confusion_change_pp": member_mean(compared["max_confusion_change_pp"]),
            "macro_f1": member_mean(report["macro_f1"]),
            "macro_f1_diff": member_mean(report["macro_f1"] - self.original["macro_f1"]),
            "largest_confusion_changes": classes.largest_changes(change, ref.class_names, k=10),
            "largest_class_changes": classes.largest_changes(class_change, ref.class_names, k=10),
            "frequency_bias": classes.frequency_bias(counts, class_change),
        }
        arrays = {"confusion_change_pp": change, "class_accuracy_change_pp": class_change,
                  **{f"class_{k}": np.asarray(report[k]).mean(0)
                     for k in ("precision", "recall", "f1")}}
        return results, arrays

    def columns(self, results):
        return {"flipped %": fmt(results.get("disagreement"), 2, scale=100),
                "max class Δ pp": fmt(results.get("max_class_acc_change_pp"), 1, True),
                "max confusion Δ pp": fmt(results.get("max_confusion_change_pp"), 1, True),
                "macro F1 Δ": fmt(results.get("macro_f1_diff"), 3, True)}

    def report(self, page, results, arrays):
        names = page.class_names
        compressed = page.compressed(results)
        page.figure(self.title, class_accuracy_change(page.directory, arrays, names),
                    "class accuracy change")
        page.figure(self.title, class_metric_change(page.directory, arrays, names, "f1"),
                    "per-class F1 change")
        rows = []
        for variant, v in compressed:
            bias = v.get("frequency_bias") or {}
            rows.append([variant, fmt(v.get("macro_f1"), 3), fmt(v.get("macro_f1_diff"), 3, True),
                         fmt(bias.get("spearman_rho"), 3, True), fmt(bias.get("p_value"), 3)])
        page.table(self.title, ["variant", "macro F1", "macro F1 Δ", "Spearman ρ (class frequency"
                                " vs accuracy Δ)", "p"], rows,
                   "Classification report and frequency bias")
        seeds = results.get("baseline", {}).get("seed_disagreement")
        page.table(self.title, ["original population", "test samples predicted differently %"],
                   [["member m against member m+1 (other seeds)", fmt(seeds, 2, scale=100)]]
                   if seeds is not None else [],
                   "Seed disagreement: the flips a variant trained from seeds of its own (design"
                   " independent) shows with no compression at all")
        page.table(self.title, ["class"] + [f"{v} F1 Δ" for v, _ in compressed],
                   [[name] + [fmt(arrays[f"{v}.class_f1"][c] - arrays["baseline.class_f1"][c], 3,
                                  True) if f"{v}.class_f1" in arrays else "–"
                              for v, _ in compressed]
                    for c, name in enumerate(names)],
                   "Per-class F1 change (member means)", markdown=False)
        for variant, _ in compressed:
            page.figure(self.title, confusion_change(page.directory, arrays, variant, names),
                        f"confusion {variant}")


def confusion_change(directory, arrays, variant, class_names) -> str | None:
    """Row-normalised confusion matrix of `variant` minus the original's, in pp (Schwaiger Fig. 1)."""
    key = f"{variant}.confusion_change_pp"
    if key not in arrays:
        return None
    change = arrays[key]
    limit = max(float(np.abs(change).max()), 0.1)
    size = 3 + 0.14 * len(class_names)
    fig, ax = plots.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(change, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"{variant}: confusion change (pp)")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=6)
    ax.set_yticks(ticks, class_names, fontsize=6)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return plots.save(fig, directory, f"confusion_change_{variant}.png")


def class_accuracy_change(directory, arrays, class_names) -> str | None:
    """Change of every class's accuracy, per variant (pp)."""
    series = {v: arrays[f"{v}.class_accuracy_change_pp"]
              for v in plots.variants_with(arrays, "class_accuracy_change_pp")}
    if not series:
        return None
    return plots.grouped_bars(directory, "class_accuracy_change.png", series, class_names,
                              "class accuracy change (pp)", "Class accuracy, compressed - original")


def class_metric_change(directory, arrays, class_names, metric="f1") -> str | None:
    """Change of every class's precision, recall or F1 (member means), per variant."""
    base = arrays.get(f"baseline.class_{metric}")
    series = {v: arrays[f"{v}.class_{metric}"] - base
              for v in plots.variants_with(arrays, f"class_{metric}") if base is not None}
    if not series:
        return None
    return plots.grouped_bars(directory, f"class_{metric}_change.png", series, class_names,
                              f"{metric} change", f"Per-class {metric}, compressed - original")
