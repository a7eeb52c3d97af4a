"""The report of a run: `report/index.html` (static, opens from disk), `report/summary.md` and the
figures, made from results.json and analysis/arrays.npz only. Each analysis writes its own
section (`Analysis.report`, from its results and arrays); the analyses skipped because they do not
apply to the model are listed with the reason."""

import html
import json
import os
import pathlib

import numpy as np

from compax.analyses import check_analyses
from compax.paper import TABLE1_VARIANTS, seed_distribution, table1_row
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


def table1_seeds(results: dict) -> Table | None:
    """Table 1's accuracy and Δ columns over the members (3+): mean, std, the central 95% of the
    members and the percentile of the study's figure among them (`paper.seed_distribution`)."""
    variants = results["variants"]
    base = np.asarray(variants["baseline"]["member_accuracy"], np.float64)
    if len(base) < 3:
        return None
    paper = table1_row(results["model"]["name"], results["dataset"]["name"]) or {}
    columns = {"accuracy %": (100 * base, paper.get("accuracy"))}
    for v in TABLE1_VARIANTS:
        if v in variants:
            delta = 100 * (np.asarray(variants[v]["member_accuracy"], np.float64) - base)
            columns[f"{v} Δ pp"] = (delta, (paper.get("diff_pp") or {}).get(v))
    rows = []
    for name, (values, figure) in columns.items():
        d = seed_distribution(values, figure)
        rows.append([name, f"{d['mean']:+.2f}" if "Δ" in name else f"{d['mean']:.2f}",
                     f"{d['std']:.2f}", f"[{d['low']:.2f}, {d['high']:.2f}]",
                     _fmt(figure, 1), _fmt(d["percentile"], 0)])
    return Table(["", "mean", "std", "95% of members", "paper", "paper's percentile"], rows)


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


def beyond_accuracy_table(results: dict, analyses) -> Table:
    """Every enabled analysis's headline cells per variant (`Analysis.columns`)."""
    header, rows = ["variant"], []
    for name, v in results["variants"].items():
        if name == "baseline":
            continue
        cells = {}
        for analysis in analyses:
            if analysis.name in v:
                cells.update(analysis.columns(v[analysis.name]))
        for key in cells:
            if key not in header:
                header.append(key)
        rows.append((name, cells))
    return Table(header, [[name] + [cells.get(k, "–") for k in header[1:]] for name, cells in rows])


def cost_table(results: dict) -> Table:
    """Parameters, multiply-adds, the int8 path's agreement and measured inference speed."""
    inference = results.get("inference", {})
    rows = []
    for name, v in results["variants"].items():
        cost = inference.get(name, {})
        int8 = v.get("int8") or {}
        speedup = cost.get("speedup_vs_float32")
        rows.append([
            name, f"{v['params']:,}" if "params" in v else "–",
            f"{v['macs']:,}" if "macs" in v else "–",
            _fmt(int8.get("argmax_agreement"), 4, scale=100), _fmt(int8.get("max_logit_difference"), 4),
            _fmt(cost.get("images_per_second"), 0), _fmt(cost.get("int8_images_per_second"), 0),
            "–" if speedup is None else f"{speedup:.2f}×" + (" (no faster than float32)"
                                                            if speedup < 1.05 else ""),
            f"{v['bytes_on_disk_population']:,}" if "bytes_on_disk_population" in v else "–"])
    return Table(["variant", "params", "MACs / image", "int8 argmax agreement %",
                  "int8 max abs Δ logit", "images/s", "int8 path images/s", "speed-up",
                  "bytes on disk (all members, orbax)"], rows)


def export_table(results: dict) -> Table | None:
    """The export stage's ONNX files in onnxruntime: bytes, speed and agreement with compax
    (None when the run exported nothing)."""
    rows = []
    for name, v in results["variants"].items():
        e = v.get("export")
        if e is None:
            continue
        rows.append([
            name, f"{v['bytes']:,}" if "bytes" in v else "–", f"{e['onnx_bytes']:,}",
            f"{e['onnx_compression_ratio']:.2f}×", _fmt(e["ort_images_per_second"], 0),
            f"{e['ort_speedup']:.2f}×", _fmt(min(e["ort_agreement"]), 2, scale=100),
            _fmt(max(e["ort_max_logit_difference"]), 4)])
    if not rows:
        return None
    return Table(["variant", "computed bytes", "ONNX file bytes", "file ratio vs baseline",
                  "onnxruntime images/s", "speed-up vs baseline", "argmax agreement % (worst member)",
                  "max abs Δ logit"], rows)


class Page:
    """What an analysis's `report` writes into: figures and tables under section titles; `run`
    is results.json."""

    def __init__(self, directory: pathlib.Path, dataset, run: dict):
        self.directory, self.dataset, self.run = directory, dataset, run
        self.class_names = list(dataset.class_names)
        self.images, self.labels = dataset.test.images, dataset.test.labels
        self.sections: dict[str, list[str]] = {}
        self.tables: dict[str, Table] = {}

    @staticmethod
    def compressed(results: dict) -> list[tuple[str, dict]]:
        """(name, results) of every compressed variant in `results` ({variant: results})."""
        return [(n, v) for n, v in results.items() if n != "baseline"]

    def figure(self, section: str, name: str | None, alt: str) -> None:
        if name:
            self.sections.setdefault(section, []).append(
                f"<img src='{name}' alt='{html.escape(alt)}'>")

    def table(self, section: str, header: list[str], rows: list[list], caption: str,
              markdown: bool = True) -> None:
        """A table under `section`; with `markdown` also in summary.md."""
        if not rows:
            return
        table = Table(header, rows)
        self.sections.setdefault(section, []).append(f"<h3>{html.escape(caption)}</h3>" + table.html())
        if markdown:
            self.tables[caption] = table


def skipped_table(results: dict) -> Table | None:
    """The analyses left out because they do not apply to the model, with the reason."""
    skipped = results.get("skipped_analyses")
    if not skipped:
        return None
    return Table(["analysis", "skipped because"], [[name, why] for name, why in skipped.items()])


def own_results(results: dict, name: str) -> dict:
    """{variant: the results of analysis `name`} of the variants that have them."""
    return {variant: v[name] for variant, v in results["variants"].items() if name in v}


def own_arrays(arrays: dict, name: str) -> dict:
    """The arrays of analysis `name` ("<variant>.<name>.<key>"), keyed "<variant>.<key>"."""
    own = {}
    for key, value in arrays.items():
        variant, analysis, rest = key.rsplit(".", 2)  # variant names may hold dots
        if analysis == name:
            own[f"{variant}.{rest}"] = value
    return own


def stages_table(results: dict) -> Table:
    rows = [[stage, r["finished"], f"{r['wall_seconds']:.0f}", r["code_version"],
             f"{r['machine']['cpu']} ({r['machine']['cpu_cores']} cores), "
             f"{r['machine']['backend']}: {', '.join(sorted(set(r['machine']['devices'])))}"]
            for stage, r in results.get("stages", {}).items()]
    analysis = results.get("analysis_seconds")
    if analysis:  # where the analyse stage's time went
        rows.append(["analyse, by part", "", f"{sum(analysis.values()):.0f}", "",
                     ", ".join(f"{k} {v:.0f} s" for k, v in analysis.items())])
    return Table(["stage", "finished (UTC)", "wall s", "code", "machine"], rows)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(directory: pathlib.Path, config, results: dict, arrays: dict, dataset) -> list[str]:
    """Writes figures, index.html and summary.md into `directory`; returns the paths written
    (relative to the workdir)."""
    directory.mkdir(parents=True, exist_ok=True)
    skipped = results.get("skipped_analyses", {})
    analyses = [a for a in check_analyses(config.analysis) if a.name not in skipped]
    page = Page(directory, dataset, results)
    tables = {"Table 1 (Schwaiger et al. 2022)": table1(results),
              "Variants: accuracy, sparsity, size": variants_table(results),
              "Inference cost and the int8 path": cost_table(results),
              "Beyond test accuracy (mean over members)": beyond_accuracy_table(results, analyses)}
    seeds = table1_seeds(results)
    if seeds is not None:
        tables = {"Table 1 (Schwaiger et al. 2022)": tables.pop("Table 1 (Schwaiger et al. 2022)"),
                  "Table 1 over the members: seed noise": seeds, **tables}
    exported = export_table(results)
    if exported is not None:
        tables["ONNX export (onnxruntime on this CPU)"] = exported
    for title, table in tables.items():
        page.sections[title] = [table.html()]
    page.figure("Pruning level", figures.sparsity_search(directory, results), "sparsity search")
    for analysis in analyses:
        analysis.report(page, own_results(results, analysis.name), own_arrays(arrays, analysis.name))
    skipped_analyses = skipped_table(results)
    if skipped_analyses is not None:
        page.sections["Analyses skipped"] = [skipped_analyses.html()]
        page.tables["Analyses skipped"] = skipped_analyses
    tables.update(page.tables)
    tables["Stages and machine"] = stages_table(results)
    page.sections["Stages and machine"] = [tables["Stages and machine"].html()]
    page.sections["Config"] = [
        f"<pre>{html.escape(json.dumps(config.to_dict(), indent=1, default=str))}</pre>"]

    title = f"compax: {results['model']['name']} on {results['dataset']['name']}"
    body = "".join(f"<h2>{html.escape(t)}</h2>" + "".join(parts)
                   for t, parts in page.sections.items())
    document = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    _write_atomic(directory / "index.html", document)
    summary = [f"# {title}\n"] + [f"## {t}\n\n{table.markdown()}\n" for t, table in tables.items()]
    _write_atomic(directory / "summary.md", "\n".join(summary))
    return ["report/index.html", "report/summary.md"]
