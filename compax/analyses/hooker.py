"""Hooker et al. (2019), "What Do Compressed Deep Neural Networks Forget?", over populations.

Per class, a two-sided Welch t-test of normalised class recall between the original and the
compressed population decides which classes are significantly impacted (p-values adjusted by
`correction`: none, bonferroni, holm, fdr_bh). `normalization`: "subtract" (default, Hooker et
al.'s released code: recall minus the population's mean accuracy) or "ratio" (recall / the
member's accuracy). A variant compressed member by member from the originals (the variant's
`design` "paired": every post-training method) also gets the paired t-test and the Wilcoxon
signed-rank test on the per-member differences; a population trained on its own (`design`
"independent", e.g. gmp from initialisation) only Welch. The counts of impacted classes are
reported for every test under both normalisations, with and without Holm's correction.
Compression identified exemplars (CIEs, Hooker's PIEs) are test samples whose modal label
differs between the populations (ties toward the larger label). The numbers behind Hooker's PIE
claims (`hooker.pie_claims`: accuracy on CIEs against the rest, in sample and held out; Spearman
against class frequency) and, in the report, impacted classes and CIEs against the compression
level per family of variants (`hooker.level_trend`). All of this needs 2+ members. The
single-model band rule of the Hooker thesis (classes whose accuracy crosses one standard
deviation around the overall accuracy) runs for every member (`compax.measure.hooker`).
"""

import html
import re

import jax.numpy as jnp
import numpy as np

from compax.analyses import Analysis, Compared, Reference, fmt, member_mean, register_analysis
from compax.errors import UserError
from compax.measure import hooker

CORRECTIONS = ("none", "bonferroni", "holm", "fdr_bh")
# Recipe settings that place a variant on its family's curve (the level) or only seed it.
_LEVEL_SETTINGS = re.compile(r"(amount|final|seed_offset)=[^,)]*")


def level_families(variants: dict) -> dict[str, list[tuple[float, int, int]]]:
    """{family: [(sparsity, impacted classes (Welch), CIEs), ...] sorted by sparsity} of the
    variants (results.json fields) made by one pruning step at a fixed level, e.g. one-shot
    `l1_global(amount=...)` and gradual `gmp(final=...)`: a family is the recipe without its
    level and seed offset (each gmp level of Hooker's design has seeds of its own), labelled by
    its step's name; families with fewer than two levels are left out (no trend)."""
    families: dict[str, list] = {}
    for v in variants.values():
        recipe, cie = v.get("recipe", ""), v.get("cie")
        amount = (v.get("sparsity") or {}).get("amount")
        if not cie or "+" in recipe or "searched" in recipe or not isinstance(amount, int | float):
            continue
        families.setdefault(_LEVEL_SETTINGS.sub("", recipe), []).append(
            (float(amount), cie["count"], cie["pies"]))
    labels: dict[str, str] = {}
    for family in families:
        step = family.split("(")[0]
        labels[family] = step if step not in labels.values() else f"{step} #{len(labels) + 1}"
    return {labels[f]: sorted(points) for f, points in families.items() if len(points) >= 2}


@register_analysis
class Hooker(Analysis):
    name = "hooker"
    title = "Populations (Hooker et al.)"
    settings = {"alpha": 0.05, "correction": "holm", "normalization": "subtract",
                "min_effect_pp": 1.0}

    @classmethod
    def check(cls, settings):
        if settings.normalization not in hooker.NORMALIZATIONS:
            raise UserError(f"unknown normalization {settings.normalization!r} in"
                            f" --config.analysis.normalization: use one of"
                            f" {', '.join(hooker.NORMALIZATIONS)}")
        if settings.correction not in CORRECTIONS:
            raise UserError(f"unknown correction {settings.correction!r} in"
                            f" --config.analysis.correction: use one of {', '.join(CORRECTIONS)}")
        if not 0 < settings.alpha < 1:
            raise UserError(f"--config.analysis.alpha must be in (0, 1), got {settings.alpha}")
        if not 0 <= settings.min_effect_pp <= 100:
            raise UserError(f"--config.analysis.min_effect_pp must be in [0, 100] (percentage"
                            f" points of normalised class accuracy), got {settings.min_effect_pp}")

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
                                                correction=correction,
                                                normalization=settings.normalization,
                                                paired=variant.design == "paired",
                                                min_effect=settings.min_effect_pp / 100)
            summary.pop("band", None)
            results["cie"] = summary
            train_counts = np.bincount(ref.dataset.train.labels, minlength=ref.num_classes)
            results["pie_claims"] = hooker.pie_claims(ref.labels, ref.preds, variant.preds,
                                                      ref.num_classes, train_counts)
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
            untestable = cie.get("untestable_classes", [])
            rows.append([variant, str(len(significant)),
                         ", ".join(names[c] for c in significant[:12])
                         + (" …" if len(significant) > 12 else ""), str(len(untestable)),
                         str(cie.get("pies")), fmt(cie.get("pie_share"), 2, scale=100)])
        if rows:
            page.table(self.title, ["variant", "significant classes", "which (Welch p<α)",
                                    "untestable (recall unchanged)", "CIEs", "CIE % of test"], rows,
                       "Welch tests and CIEs. A class whose recall is the same in both populations"
                       " is untestable: its normalised change is the whole model's, not evidence"
                       " about the class (compax.measure.hooker.untestable_classes)")
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

        self._report_tests(page, results)
        self._report_pie_claims(page, results)
        self._report_levels(page, results)

    def _report_tests(self, page, results):
        columns = [(test, normalization) for test in hooker.TESTS for normalization in hooker.NORMALIZATIONS]
        rows = []
        for variant, v in page.compressed(results):
            counts = (v.get("cie") or {}).get("counts")
            if not counts:
                continue
            cells = [f"{c['none']} / {c['holm']}" if (c := counts.get(t, {}).get(n)) else "–"
                     for t, n in columns]
            rows.append([variant, v["cie"].get("design", "paired"), *cells])
        page.table(self.title, ["variant", "design", *(f"{t} ({n})" for t, n in columns)], rows,
                   "Impacted classes per test and normalisation: uncorrected / Holm (paired tests"
                   " only where each member was compressed from its original)")
        rows = []
        for variant, v in page.compressed(results):
            cie = v.get("cie")
            if not cie or "material_count" not in cie:
                continue
            tests = {"welch": cie, **cie.get("paired_tests", {})}
            rows.append([variant, *(
                f"{r['count']} / {r['material_count']} / {fmt(r['median_abs_change'], 2, scale=100)}"
                if (r := tests.get(t)) else "–" for t in hooker.TESTS)])
        if rows:
            floor = fmt(next(v["cie"]["min_effect"] for _, v in page.compressed(results)
                             if (v.get("cie") or {}).get("min_effect") is not None), 1, scale=100)
            page.table(self.title, ["variant", *hooker.TESTS], rows,
                       f"Effect sizes: impacted classes (the configured correction) / of them with"
                       f" |Δ normalised accuracy| ≥ {floor} pp / their median |Δ| in pp")

    def _report_pie_claims(self, page, results):
        rows, bars = [], {}
        for variant, v in page.compressed(results):
            claims = v.get("pie_claims")
            if not claims:
                continue
            cells = []
            for part in ("in_sample", "held_out"):
                c = claims.get(part) or {}
                cells += [str(c.get("cies", "–")),
                          *(fmt(c.get(k), 2, scale=100) for k in (
                              "original_accuracy_on_cies", "original_accuracy_on_rest",
                              "drop_on_cies", "drop_on_rest"))]
            spearman = claims.get("frequency_spearman")
            cells.append(f"{spearman['rho']:+.2f} (p {spearman['p']:.3f})" if spearman else "–")
            rows.append([variant, *cells])
            chosen = claims.get("held_out") or claims["in_sample"]
            bars[variant] = tuple(chosen.get(k) for k in ("original_accuracy_on_cies",
                                                          "original_accuracy_on_rest",
                                                          "drop_on_cies", "drop_on_rest"))
        part = ["CIEs", "orig. acc. CIEs %", "orig. acc. rest %", "drop CIEs pp", "drop rest pp"]
        page.table(self.title, ["variant", *part, *(f"held out: {h}" for h in part),
                                "Spearman: train frequency vs Δ class acc."], rows,
                   "Hooker's PIE claims: accuracy on CIEs against the rest (held out: CIEs from the"
                   " even members, accuracies of the odd ones)")
        from compax.report import figures
        page.figure(self.title, figures.pie_accuracy(page.directory, bars),
                    "Accuracy on CIEs and on the rest")

    def _report_levels(self, page, results):
        from compax.report import figures
        curves = level_families(dict(page.compressed(results)))
        page.figure(self.title, figures.level_trends(page.directory, curves),
                    "Impacted classes and CIEs against sparsity")
        rows = []
        for label, points in curves.items():
            levels = [p[0] for p in points]
            for what, k in (("impacted classes", 1), ("CIEs", 2)):
                trend = hooker.level_trend(levels, [p[k] for p in points])
                rows.append([label, what, ", ".join(f"{p[0]:g}: {p[k]}" for p in points),
                             f"{trend['rho']:+.2f} (p {trend['p']:.3f})" if trend else "–"])
        page.table(self.title, ["family", "count", "per level", "Spearman ρ with level"], rows,
                   "Do impacted classes and CIEs grow with sparsity? (Hooker et al.)")
