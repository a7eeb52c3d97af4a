"""Confidence and calibration (Schwaiger et al. 2022; Mantowsky et al.; Guo et al. 2017).

Per member: the expected and the maximum calibration error (ECE, MCE; Guo et al. 2017, eqs. 3
and 5, over `bins` confidence bins) of the variant and their changes against the original member
(results: means over members with their std), the change of the softmax confidence in the target
class split by same / different prediction (summaries per member, reported as mean ± std over
members), and reliability bins (accuracy per confidence bin) of every member, drawn as the member
mean with member 0's confidence-change histogram kept as the example.
"""

import warnings

import numpy as np

from compax import plots
from compax.analyses.base import (
    Analysis,
    finite,
    fmt,
    fmt_mean_std,
    integer_setting,
    mean_std,
    register_analysis,
)


@register_analysis
class Calibration(Analysis):
    name = "calibration"
    title = "Confidence and calibration"
    settings = {"bins": 15}

    @classmethod
    def check(cls, settings):
        integer_setting(settings, cls.name, "bins", 1)

    def _members(self, ref, logits: np.ndarray):
        """(ECE (P,), MCE (P,), reliability bins (P, bins)) of every member's test `logits`."""
        import jax
        import jax.numpy as jnp

        from compax.measure import calibration

        labels, bins, logits = jnp.asarray(ref.labels), self.settings.bins, jnp.asarray(logits)
        ece = jax.vmap(lambda z: calibration.expected_calibration_error(z, labels, bins))
        mce = jax.vmap(lambda z: calibration.maximum_calibration_error(z, labels, bins))
        reliability = jax.vmap(lambda z: calibration.calibration_bins(z, labels, bins))
        return (np.asarray(ece(logits)), np.asarray(mce(logits)),
                jax.tree.map(np.asarray, reliability(logits)))

    def _arrays(self, reliability) -> dict:
        """Reliability bins as member means (accuracy over the members with samples in a bin)."""
        count = reliability["count"]
        accuracy = np.where(count > 0, reliability["accuracy"], np.nan)
        confidence = np.where(count > 0, reliability["confidence"], np.nan)
        with warnings.catch_warnings():  # bins empty in every member stay 0
            warnings.simplefilter("ignore", RuntimeWarning)
            return {"reliability_accuracy": np.nan_to_num(np.nanmean(accuracy, 0)),
                    "reliability_accuracy_std": np.nan_to_num(np.nanstd(accuracy, 0)),
                    "reliability_confidence": np.nan_to_num(np.nanmean(confidence, 0)),
                    "reliability_count": count.mean(0)}

    def prepare(self, ref):
        self.ece, self.mce, self.reliability = self._members(ref, ref.logits)

    def baseline(self, ref):
        return ({"ece": float(self.ece.mean()), "ece_std": float(self.ece.std()),
                 "mce": float(self.mce.mean()), "mce_std": float(self.mce.std())},
                self._arrays(self.reliability))

    def compare(self, ref, variant):
        import jax
        import jax.numpy as jnp

        from compax.measure import calibration

        labels = jnp.asarray(ref.labels)
        ece, mce, reliability = self._members(ref, variant.logits)
        changes = jax.vmap(lambda a, b: calibration.confidence_change(a, b, labels))(
            jnp.asarray(ref.logits), jnp.asarray(variant.logits))
        groups = {}
        for group in ("all", "same", "different"):
            stats = {k: np.asarray(v) for k, v in changes[group].items()}
            groups[group] = {
                **{k: finite(v[0]) for k, v in stats.items()},  # member 0, as the figure
                "members": {k: mean_std(v) for k, v in stats.items() if v.ndim == 1}}
        results = {"ece": float(ece.mean()), "ece_std": float(ece.std()),
                   "delta_ece": float((ece - self.ece).mean()),
                   "delta_ece_std": float((ece - self.ece).std()),
                   "mce": float(mce.mean()), "mce_std": float(mce.std()),
                   "delta_mce": float((mce - self.mce).mean()),
                   "delta_mce_std": float((mce - self.mce).std()),
                   "confidence_diff": groups}
        arrays = {"confidence_diff": np.asarray(changes["diff"][0]),
                  "same_prediction": np.asarray(changes["same_prediction"][0]),
                  **self._arrays(reliability)}
        return results, arrays

    def columns(self, results):
        conf = ((results.get("confidence_diff") or {}).get("all") or {}).get("members", {})
        return {"confidence Δ pp": fmt_mean_std(conf.get("mean"), 2, 100, True),
                "ECE": fmt(results.get("ece"), 3), "ΔECE": fmt(results.get("delta_ece"), 3, True),
                "MCE": fmt(results.get("mce"), 3), "ΔMCE": fmt(results.get("delta_mce"), 3, True)}

    def report(self, page, results, arrays):
        page.figure(self.title, confidence_histograms(page.directory, arrays),
                    "confidence change (member 0)")
        page.figure(self.title, reliability(page.directory, results, arrays),
                    "reliability diagrams (member means)")
        rows = []
        for variant, v in page.compressed(results):
            members = ((v.get("confidence_diff") or {}).get("all") or {}).get("members", {})
            different = ((v.get("confidence_diff") or {}).get("different") or {}).get("members", {})
            rows.append([variant, f"{fmt(v.get('ece'), 3)} ± {fmt(v.get('ece_std'), 3)}",
                         f"{fmt(v.get('delta_ece'), 3, True)} ± {fmt(v.get('delta_ece_std'), 3)}",
                         f"{fmt(v.get('mce'), 3)} ± {fmt(v.get('mce_std'), 3)}",
                         f"{fmt(v.get('delta_mce'), 3, True)} ± {fmt(v.get('delta_mce_std'), 3)}",
                         fmt_mean_std(members.get("mean"), 2, 100, True),
                         fmt_mean_std(different.get("mean"), 2, 100, True),
                         fmt_mean_std(different.get("count"), 1)])
        page.table(self.title, ["variant", "ECE", "ΔECE", "MCE", "ΔMCE", "confidence Δ pp (all)",
                                "confidence Δ pp (changed predictions)", "changed predictions"],
                   rows, "Calibration over members (mean ± std)")


def confidence_histograms(directory, arrays) -> str | None:
    """Target-class confidence change, same vs different prediction (Schwaiger Figs. 2-3)."""
    variants = plots.variants_with(arrays, "confidence_diff")
    if not variants:
        return None
    fig, axes = plots.subplots(1, len(variants), figsize=(3.2 * len(variants), 3), squeeze=False)
    bins = np.linspace(-1, 1, 41)
    for ax, v in zip(axes[0], variants, strict=True):
        diff, same = arrays[f"{v}.confidence_diff"], arrays[f"{v}.same_prediction"].astype(bool)
        ax.hist(diff[same], bins, alpha=0.7, label=f"same ({same.sum()})", log=True)
        ax.hist(diff[~same], bins, alpha=0.7, label=f"different ({(~same).sum()})", log=True)
        ax.set(title=v, xlabel="confidence change")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test samples")
    return plots.save(fig, directory, "confidence_change.png")


def reliability(directory, results, arrays) -> str | None:
    """Reliability diagrams: accuracy over confidence bins, original and each variant."""
    names = [v for v in results if f"{v}.reliability_accuracy" in arrays]
    if not names:
        return None
    fig, axes = plots.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    for ax, v in zip(axes[0], names, strict=True):
        accuracy, confidence = arrays[f"{v}.reliability_accuracy"], arrays[f"{v}.reliability_confidence"]
        count = arrays[f"{v}.reliability_count"]
        edges = np.linspace(0, 1, len(accuracy) + 1)
        ax.bar(edges[:-1], np.where(count > 0, accuracy, 0), 1 / len(accuracy), align="edge",
               edgecolor="black", lw=0.3)
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.plot(confidence[count > 0], accuracy[count > 0], ".", color="C3", ms=3)
        ece = results[v].get("ece")
        ax.set(title=f"{v}" + (f"\nECE {ece:.3f}" if ece is not None else ""), xlabel="confidence")
    axes[0][0].set_ylabel("accuracy")
    return plots.save(fig, directory, "reliability.png")
