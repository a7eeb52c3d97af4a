"""The export stage's results of finished workdirs as one Markdown table per workdir.

python experiments/export_table.py runs/gtsrb_hooker10 [runs/gtsrb_vgg_export ...]

Per variant (results.json `variants.<v>.export`, compax/export_population.py): the computed bytes
of one member, its ONNX file's bytes and the baseline file's over them, onnxruntime's images/s of
member 0 and its speed-up over the baseline's (the same interleaved rounds), onnxruntime's argmax
agreement with compax on the test set (mean and lowest over the members) and the largest logit
difference (over members). The last line is one JSON object: {workdir: {variant: {...}}}.
"""

import json
import pathlib
import sys

import numpy as np


def rows(results: dict) -> dict:
    """{variant: the table's fields} of one results.json."""
    table = {}
    for name, fields in results["variants"].items():
        e = fields.get("export")
        if e is None:
            continue
        table[name] = {
            "computed_bytes": e["computed_bytes"], "onnx_bytes": e["onnx_bytes"],
            "onnx_compression_ratio": round(e["onnx_compression_ratio"], 3),
            "ort_images_per_second": round(e["ort_images_per_second"]),
            "ort_speedup": round(e["ort_speedup"], 3),
            "agreement_mean": float(np.mean(e["ort_agreement"])),
            "agreement_min": float(np.min(e["ort_agreement"])),
            "max_logit_difference": float(np.max(e["ort_max_logit_difference"])),
            "members": len(e["ort_agreement"])}
    return table


def markdown(table: dict) -> str:
    lines = ["| variant | computed bytes | ONNX bytes | file ratio | onnxruntime images/s | speed-up |"
             " agreement % mean (lowest) | max abs Δ logit |", "|---" * 8 + "|"]
    for name, r in table.items():
        lines.append(f"| {name} | {r['computed_bytes']:,} | {r['onnx_bytes']:,} |"
                     f" {r['onnx_compression_ratio']:.2f}× | {r['ort_images_per_second']:,} |"
                     f" {r['ort_speedup']:.2f}× | {100 * r['agreement_mean']:.2f}"
                     f" ({100 * r['agreement_min']:.2f}) | {r['max_logit_difference']:.2g} |")
    return "\n".join(lines)


def main(workdirs: list[str]) -> None:
    if not workdirs:
        sys.exit("usage: python experiments/export_table.py WORKDIR [WORKDIR ...]")
    everything = {}
    for workdir in workdirs:
        path = pathlib.Path(workdir) / "results.json"
        if not path.is_file():
            sys.exit(f"error: {path} does not exist: give a finished workdir")
        results = json.loads(path.read_text())
        table = rows(results)
        if not table:
            sys.exit(f"error: {workdir} has no export results: run launch.py with its config,"
                     f" --workdir={workdir} --config.stages=export,report")
        stage = results["stages"]["export"]
        print(f"## {workdir}: {results['model']['name']} on {results['dataset']['name']}, export"
              f" stage {stage['finished']}, {stage['machine']['cpu']}\n")
        print(markdown(table) + "\n")
        everything[workdir] = table
    print(json.dumps(everything))


if __name__ == "__main__":
    main(sys.argv[1:])
