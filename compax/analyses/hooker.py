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

import re

import numpy as np

from compax import plots
from compax.analyses.base import Analysis, fmt, register_analysis
from compax.errors import UserError

CORRECTIONS = ("none", "bonferroni", "holm", "fdr_bh")
# Recipe settings that place a variant on its family's curve (the level) or only seed it.
_LEVEL_SETTINGS = re.compile(r"(amount|final|seed_offset)=[^,)]*")


def level_families(variants: dict) -> dict[str, list[tuple[float, int, int]]]:
    """{family: [(sparsity, impacted classes (Welch), CIEs), ...] sorted by sparsity} of the
    variants (results.json's `variants`, with this analysis's results under "hooker") made by
    one pruning step at a fixed level, e.g. one-shot `l1_global(amount=...)` and gradual
    `gmp(final=...)`: a family is the recipe without its
    level and seed offset (each gmp level of Hooker's design has seeds of its own), labelled by
    its step's name; families with fewer than two levels are left out (no trend)."""
    families: dict[str, list] = {}
    for v in variants.values():
        recipe, cie = v.get("recipe", ""), (v.get("hooker") or {}).get("cie")
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
        from compax.measure.hooker import NORMALIZATIONS

        if settings.normalization not in NORMALIZATIONS:
            raise UserError(f"unknown normalization {settings.normalization!r} in"
                            f" --config.analysis.hooker.normalization: use one of"
                            f" {', '.join(NORMALIZATIONS)}")
        if settings.correction not in CORRECTIONS:
            raise UserError(f"unknown correction {settings.correction!r} in"
                            f" --config.analysis.hooker.correction: use one of"
                            f" {', '.join(CORRECTIONS)}")
        if not 0 < settings.alpha < 1:
            raise UserError(f"--config.analysis.hooker.alpha must be in (0, 1), got"
                            f" {settings.alpha}")
        if not 0 <= settings.min_effect_pp <= 100:
            raise UserError(f"--config.analysis.hooker.min_effect_pp must be in [0, 100]"
                            f" (percentage points of normalised class accuracy), got"
                            f" {settings.min_effect_pp}")

    def compare(self, ref, variant):
        import jax.numpy as jnp

        from compax.analyses.reference import member_mean
        from compax.measure import hooker

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
            settings = self.settings
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
        names = page.class_names
        compressed = page.compressed(results)
        rows = []
        for variant, v in compressed:
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
                    for variant, v in compressed if (b := v.get("band"))],
                   "Band rule (Hooker thesis), member means")
        page.figure(self.title, cie_bars(page.directory, arrays, names), "CIEs per class")
        for variant, _ in compressed:
            index = arrays.get(f"{variant}.cie_indices")
            if index is None or not len(index):
                continue
            titles = [names[page.labels[i]][:12] for i in index[:30]]
            page.figure(self.title, plots.example_images(page.directory, page.images, index,
                                                         f"cie_{variant}.png", titles),
                        f"CIEs of {variant}")

        self._report_tests(page, compressed)
        self._report_pie_claims(page, compressed)
        self._report_levels(page)

    def _report_tests(self, page, compressed):
        from compax.measure.hooker import NORMALIZATIONS, TESTS

        columns = [(test, normalization) for test in TESTS for normalization in NORMALIZATIONS]
        rows = []
        for variant, v in compressed:
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
        for variant, v in compressed:
            cie = v.get("cie")
            if not cie or "material_count" not in cie:
                continue
            tests = {"welch": cie, **cie.get("paired_tests", {})}
            rows.append([variant, *(
                f"{r['count']} / {r['material_count']} / {fmt(r['median_abs_change'], 2, scale=100)}"
                if (r := tests.get(t)) else "–" for t in TESTS)])
        if rows:
            floor = fmt(next(v["cie"]["min_effect"] for _, v in compressed
                             if (v.get("cie") or {}).get("min_effect") is not None), 1, scale=100)
            page.table(self.title, ["variant", *TESTS], rows,
                       f"Effect sizes: impacted classes (the configured correction) / of them with"
                       f" |Δ normalised accuracy| ≥ {floor} pp / their median |Δ| in pp")

    def _report_pie_claims(self, page, compressed):
        rows, bars = [], {}
        for variant, v in compressed:
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
        page.figure(self.title, pie_accuracy(page.directory, bars),
                    "Accuracy on CIEs and on the rest")

    def _report_levels(self, page):
        from compax.measure.hooker import level_trend

        curves = level_families(dict(page.compressed(page.run["variants"])))
        page.figure(self.title, level_trends(page.directory, curves),
                    "Impacted classes and CIEs against sparsity")
        rows = []
        for label, points in curves.items():
            levels = [p[0] for p in points]
            for what, k in (("impacted classes", 1), ("CIEs", 2)):
                trend = level_trend(levels, [p[k] for p in points])
                rows.append([label, what, ", ".join(f"{p[0]:g}: {p[k]}" for p in points),
                             f"{trend['rho']:+.2f} (p {trend['p']:.3f})" if trend else "–"])
        page.table(self.title, ["family", "count", "per level", "Spearman ρ with level"], rows,
                   "Do impacted classes and CIEs grow with sparsity? (Hooker et al.)")


def cie_bars(directory, arrays, class_names) -> str | None:
    """Compression identified exemplars per class, per variant (Hooker et al.)."""
    series = {f"{v} ({int(arrays[f'{v}.cie_per_class'].sum())})": arrays[f"{v}.cie_per_class"]
              for v in plots.variants_with(arrays, "cie_per_class")}
    if not series:
        return None
    return plots.grouped_bars(directory, "cie_per_class.png", series, class_names,
                              "CIEs (test samples)", "Compression identified exemplars per true class")


def level_trends(directory, families: dict) -> str | None:
    """Impacted classes and CIEs against the compression level, one line per family of variants
    (Hooker et al.'s figures: e.g. one-shot and gradual pruning on one plot). `families`:
    {label: [(level, impacted classes, CIEs), ...]} sorted by level."""
    families = {label: points for label, points in families.items() if len(points) >= 2}
    if not families:
        return None
    fig, axes = plots.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    draw_level_trends(axes, families)
    return plots.save(fig, directory, "level_trends.png")


def draw_level_trends(axes, families: dict, floor: tuple | None = None,
                      impacted_title: str = "Impacted classes (Welch)") -> None:
    """Draws `level_trends`' two panels on `axes` (impacted classes, CIEs): one line per family
    ({label: [(level, impacted classes, CIEs), ...]}); `floor` (label, impacted classes, CIEs), if
    given, as a dashed horizontal line on each panel (e.g. a second uncompressed population)."""
    for label, points in families.items():
        levels, impacted, cies = (np.asarray(column, float) for column in zip(*points, strict=True))
        axes[0].plot(levels, impacted, "o-", label=label)
        axes[1].plot(levels, cies, "o-", label=label)
    if floor is not None:
        label, impacted, cies = floor
        axes[0].axhline(impacted, color="grey", ls="--", lw=1, label=label)
        axes[1].axhline(cies, color="grey", ls="--", lw=1, label=label)
    axes[0].set(xlabel="sparsity", ylabel="impacted classes", title=impacted_title)
    axes[1].set(xlabel="sparsity", ylabel="CIEs (test samples)", title="CIEs / PIEs")
    axes[1].legend(fontsize=7)


def pie_accuracy(directory, rows: dict) -> str | None:
    """The original population's accuracy on each variant's CIEs and on the other test samples,
    and the variant's drop on each (`rows`: {variant: (acc CIEs, acc rest, drop CIEs, drop rest)})."""
    rows = {v: r for v, r in rows.items() if None not in r}
    if not rows:
        return None
    names, values = list(rows), np.asarray(list(rows.values()), float)
    x = np.arange(len(names))
    fig, axes = plots.subplots(1, 2, figsize=(max(6, 0.9 * len(names)), 3.2))
    for ax, (a, b), title in ((axes[0], (0, 1), "original accuracy"),
                              (axes[1], (2, 3), "accuracy drop after compression")):
        ax.bar(x - 0.2, 100 * values[:, a], 0.4, label="on CIEs")
        ax.bar(x + 0.2, 100 * values[:, b], 0.4, label="on the rest")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel="%", title=title)
    axes[0].legend(fontsize=7)
    return plots.save(fig, directory, "pie_accuracy.png")
