"""The report of a run: `report/index.html` (static, opens from disk), `report/summary.md` and the
figures, made from results.json and analysis/arrays.npz only."""

import html
import json
import os
import pathlib

import numpy as np

from compax.paper import TABLE1_VARIANTS, table1_row
from compax.report import figures

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.paper td { color: #666; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
"""


class Table:
    """A table rendered both as HTML and as Markdown."""

    def __init__(self, header: list[str], rows: list[list], classes: list[str] | None = None):
        self.header, self.rows = header, rows
        self.classes = classes or [""] * len(rows)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            f"<tr class='{c}'>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in row) + "</tr>"
            for row, c in zip(self.rows, self.classes, strict=True))
        return f"<table><tr>{head}</tr>{body}</table>"

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in self.rows]
        return "\n".join(lines)


def _fmt(value, digits=2, signed=False, scale=1.0) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{scale * value:+.{digits}f}" if signed else f"{scale * value:.{digits}f}"


def table1(results: dict) -> Table:
    """This run's Table 1 row next to the study's."""
    variants = results["variants"]
    base = variants["baseline"]
    pruned = variants.get("pruned", {}).get("sparsity") or {}
    members = len(base["member_accuracy"])
    ours = [f"compax ({members} member{'s' if members > 1 else ''})",
            _fmt(pruned.get("fraction_of_params"), 1, scale=100),
            f"{100 * base['accuracy']:.2f} ± {100 * base['accuracy_std']:.2f}"]
    ours += [_fmt(variants[v].get("accuracy_diff_pp"), 2, True) if v in variants else "–"
             for v in TABLE1_VARIANTS]
    rows, classes = [ours], [""]
    paper = table1_row(results["model"]["name"], results["dataset"]["name"])
    if paper:
        rows.append(["Schwaiger et al. (2022)", f"{paper['pruned_percent']:.1f}", f"{paper['accuracy']:.1f}"]
                    + [f"{paper['diff_pp'][v]:+.1f}" for v in TABLE1_VARIANTS])
        classes.append("paper")
    return Table(["", "% pruned", "accuracy %"] + [f"{v} Δ pp" for v in TABLE1_VARIANTS], rows,
                 classes)


def variants_table(results: dict) -> Table:
    rows = []
    for name, v in results["variants"].items():
        sparsity = v.get("sparsity") or {}
        rows.append([name, f"{100 * v['accuracy']:.2f} ± {100 * v.get('accuracy_std', 0):.2f}",
                     _fmt(v.get("accuracy_diff_pp"), 2, True) if name != "baseline" else "",
                     _fmt(sparsity.get("fraction_of_weights"), 1, scale=100),
                     f"w{v['weight_bits']}a{v['activation_bits']}", f"{v['bytes']:,}",
                     _fmt(v.get("compression_ratio"), 2)])
    return Table(["variant", "test accuracy %", "Δ pp", "% weights pruned", "bits", "bytes",
                  "compression ×"], rows)


def beyond_accuracy_table(results: dict) -> Table:
    """The analyses' headline numbers per variant (means over members)."""
    rows = []
    for name, v in results["variants"].items():
        if name == "baseline":
            continue
        conf = (v.get("confidence_diff") or {}).get("all", {})
        attack = v.get("attack") or {}
        rows.append([
            name, _fmt(v.get("disagreement"), 2, scale=100),
            _fmt(v.get("max_class_acc_change_pp"), 1, True),
            _fmt(v.get("max_confusion_change_pp"), 1, True),
            _fmt(conf.get("mean"), 2, True, scale=100),
            _fmt(v.get("ece"), 3), _fmt(v.get("delta_ece"), 3, True),
            _fmt(v.get("saliency_mad_mean"), 3), _fmt(v.get("hcc_mean"), 3),
            _fmt(v.get("roi_saliency_mass_change"), 3, True),
            _fmt(v.get("gradcam_mad_mean"), 3), _fmt(v.get("tsne_silhouette"), 3),
            _fmt(attack.get("success_rate"), 2), _fmt(attack.get("mean_l2"), 3)])
    return Table(["variant", "flipped %", "max class Δ pp", "max confusion Δ pp",
                  "confidence Δ pp", "ECE", "ΔECE", "saliency MAD", "HCC", "ROI mass Δ",
                  "Grad-CAM MAD", "t-SNE silhouette", "CW success", "CW mean L2"], rows)


def population_table(results: dict, class_names) -> Table | None:
    rows = []
    for name, v in results["variants"].items():
        cie = v.get("cie")
        if not cie:
            continue
        significant = cie.get("significant_classes", [])
        rows.append([name, str(len(significant)),
                     ", ".join(class_names[c] for c in significant[:12])
                     + (" …" if len(significant) > 12 else ""),
                     str(cie.get("pies")), _fmt(cie.get("pie_share"), 2, scale=100)])
    if not rows:
        return None
    return Table(["variant", "significant classes", "which (Welch p<α)", "CIEs", "CIE % of test"],
                 rows)


def stages_table(results: dict) -> Table:
    rows = [[stage, r["finished"], f"{r['wall_seconds']:.0f}", r["code_version"],
             f"{r['machine']['cpu']} ({r['machine']['cpu_cores']} cores), "
             f"{r['machine']['backend']}: {', '.join(sorted(set(r['machine']['devices'])))}"]
            for stage, r in results.get("stages", {}).items()]
    return Table(["stage", "finished (UTC)", "wall s", "code", "machine"], rows)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(directory: pathlib.Path, config, results: dict, arrays: dict, dataset) -> list[str]:
    """Writes figures, index.html and summary.md into `directory`; returns the paths written
    (relative to the workdir)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(dataset.class_names)
    images = dataset.test.images
    variants = figures.compressed_variants(results)
    sections = []  # (title, [html parts])

    def add(title, *parts):
        parts = [p for p in parts if p]
        if parts:
            sections.append((title, parts))

    def img(name, alt):
        return f"<img src='{name}' alt='{html.escape(alt)}'>" if name else ""

    tables = {"Table 1 (Schwaiger et al. 2022)": table1(results),
              "Variants: accuracy, sparsity, size": variants_table(results),
              "Beyond test accuracy (mean over members)": beyond_accuracy_table(results)}
    population = population_table(results, names)
    if population:
        tables["Populations (Hooker et al.)"] = population
    tables["Stages and machine"] = stages_table(results)
    for title, table in tables.items():
        add(title, table.html())
    add("Pruning level", img(figures.sparsity_search(directory, results), "sparsity search"))
    add("Class level",
        img(figures.class_accuracy_change(directory, results, arrays, names), "class accuracy"),
        *[img(figures.confusion_change(directory, arrays, v, names), f"confusion {v}")
          for v in variants])
    add("Confidence and calibration",
        img(figures.confidence_histograms(directory, results, arrays), "confidence change"),
        img(figures.reliability(directory, results, arrays), "reliability diagrams"))
    for method in ("saliency", "gradcam"):
        add("Saliency" if method == "saliency" else "Grad-CAM",
            img(figures.mad_distribution(directory, results, arrays, method), f"{method} MAD"),
            img(figures.attention_side_by_side(directory, results, arrays, images, method),
                f"{method} side by side"),
            *[img(figures.attention_grid(directory, arrays, v, images, method), f"{method} {v}")
              for v in variants])
    add("Embeddings (t-SNE)", img(figures.tsne(directory, results, arrays, names), "t-SNE"))
    cie_images = []
    for v in variants:
        key = f"{v}.cie_indices"
        if key in arrays and len(arrays[key]):
            index = arrays[key]
            cie_images.append(f"<h3>CIEs of {html.escape(v)}</h3>" + img(figures.example_images(
                directory, images, index, f"cie_{v}.png",
                [names[dataset.test.labels[i]][:12] for i in index[:30]]), f"CIEs {v}"))
    add("Compression identified exemplars",
        img(figures.cie_bars(directory, results, arrays, names), "CIEs per class"), *cie_images)
    add("Config", f"<pre>{html.escape(json.dumps(config.to_dict(), indent=1, default=str))}</pre>")

    title = f"compax: {results['model']['name']} on {results['dataset']['name']}"
    body = "".join(f"<h2>{html.escape(t)}</h2>" + "".join(parts) for t, parts in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    _write_atomic(directory / "index.html", page)
    summary = [f"# {title}\n"] + [f"## {t}\n\n{table.markdown()}\n" for t, table in tables.items()]
    _write_atomic(directory / "summary.md", "\n".join(summary))
    return ["report/index.html", "report/summary.md"]
