"""Hooker et al. (2019), "What Do Compressed Deep Neural Networks Forget?", over populations.

Per class, a two-sided Welch t-test of normalised class recall between the original and the
compressed population decides which classes are significantly impacted (p-values adjusted by
`correction`: none, bonferroni, holm, fdr_bh); compression identified exemplars (CIEs, Hooker's
PIEs) are test samples whose modal label differs between the populations. Both need 2+ members.
The single-model band rule of the Hooker thesis (classes whose accuracy crosses one standard
deviation around the overall accuracy) runs for every member (`compax.analysis.hooker`).
"""

import html

import jax.numpy as jnp
import numpy as np

from compax.analyses import Analysis, Compared, Reference, fmt, member_mean, register_analysis
from compax.analysis import hooker
from compax.errors import UserError

CORRECTIONS = ("none", "bonferroni", "holm", "fdr_bh")


@register_analysis
class Hooker(Analysis):
    name = "hooker"
    title = "Populations (Hooker et al.)"
    settings = {"alpha": 0.05, "correction": "holm"}

    @classmethod
    def check(cls, settings):
        if settings.correction not in CORRECTIONS:
            raise UserError(f"unknown correction {settings.correction!r} in"
                            f" --config.analysis.correction: use one of {', '.join(CORRECTIONS)}")
        if not 0 < settings.alpha < 1:
            raise UserError(f"--config.analysis.alpha must be in (0, 1), got {settings.alpha}")

    def compare(self, ref: Reference, variant: Compared):
        labels = jnp.asarray(ref.labels)
        band = hooker.band_impacted_classes(labels, jnp.asarray(ref.preds),
                                            jnp.asarray(variant.preds), ref.num_classes)
        results = {"band": {
            "outside_original": member_mean(band["outside_original"].sum(-1)),
            "outside_compressed": member_mean(band["outside_compressed"].sum(-1)),
            "crossed": member_mean(band["crossed"].sum(-1)),
            "impacted_images": member_mean(band["impacted_images"])}}
        arrays = {"band_crossing_share": np.asarray(band["crossed"]).mean(0)}
        if ref.members >= 2:
            settings = ref.settings
            correction = None if settings.correction == "none" else settings.correction
            summary = hooker.population_summary(ref.labels, ref.preds, variant.preds,
                                                ref.num_classes, alpha=settings.alpha,
                                                correction=correction)
            summary.pop("band", None)
            results["cie"] = summary
            cies = hooker.compression_identified_exemplars(ref.preds, variant.preds,
                                                           ref.num_classes, ref.labels)
            arrays["cie_per_class"] = np.asarray(cies["per_class"])
            arrays["cie_indices"] = np.asarray(cies["indices"])
        return results, arrays

    def columns(self, results):
        cie = results.get("cie") or {}
        return {"band crossed": fmt((results.get("band") or {}).get("crossed"), 1),
                "Welch impacted": str(cie["count"]) if cie else "–",
                "CIEs": str(cie["pies"]) if cie else "–"}

    def report(self, page, results, arrays):
        from compax.report import figures

        names = page.class_names
        rows = []
        for variant, v in page.compressed(results):
            cie = v.get("cie")
            if not cie:
                continue
            significant = cie.get("significant_classes", [])
            rows.append([variant, str(len(significant)),
                         ", ".join(names[c] for c in significant[:12])
                         + (" …" if len(significant) > 12 else ""),
                         str(cie.get("pies")), fmt(cie.get("pie_share"), 2, scale=100)])
        if rows:
            page.table(self.title, ["variant", "significant classes", "which (Welch p<α)", "CIEs",
                                    "CIE % of test"], rows, "Welch tests and CIEs")
        page.table(self.title, ["variant", "classes outside the band (original)",
                                "outside (compressed)", "crossed", "images of crossed classes"],
                   [[variant, fmt(b.get("outside_original"), 1), fmt(b.get("outside_compressed"), 1),
                     fmt(b.get("crossed"), 1), fmt(b.get("impacted_images"), 1)]
                    for variant, v in page.compressed(results) if (b := v.get("band"))],
                   "Band rule (Hooker thesis), member means")
        page.figure(self.title, figures.cie_bars(page.directory, results, arrays, names),
                    "CIEs per class")
        for variant, _ in page.compressed(results):
            index = arrays.get(f"{variant}.cie_indices")
            if index is None or not len(index):
                continue
            titles = [names[page.labels[i]][:12] for i in index[:30]]
            page.figure(self.title, figures.example_images(page.directory, page.images, index,
                                                           f"cie_{variant}.png", titles),
                        f"CIEs of {html.escape(variant)}")
