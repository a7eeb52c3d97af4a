"""The headline figures of RESULTS.md as small PNGs under docs/, made from finished runs' results.json.

python experiments/results_figures.py --table1=runs/gtsrb_hooker10 --hooker=runs/gtsrb_hooker10

`--table1=WORKDIR[,WORKDIR...]`: runs of a baseline population with the variants pruned, w4a8,
w8a8 and pruned_w8a8. `docs/table1_seed_ranges.png`: one row of panels per (model, dataset) pair,
the members' test accuracy and each member's Δ (its variant against itself, pp) of every Table 1
variant as dots, their mean ± std (thick bar) and central 95% (thin bar, `compax.paper.
seed_distribution`, 3+ members) beside the paper's figure (a red diamond, `compax.paper.TABLE1`).
Workdirs of the same pair sit side by side, each labelled with its member count and setting.

`--hooker=WORKDIR`: a run of Hooker et al.'s design (configs/gtsrb_lenet_hooker.py: gradual `gmp`
populations per level and one-shot `sparsity_*` variants of the baseline). `docs/hooker_levels.png`:
impacted classes (Welch, the run's correction) and CIEs against sparsity, one-shot and gradual on
the same axes (`compax.analyses.hooker.level_families`, drawn by `compax.analyses.hooker.
draw_level_trends`), the searched one-shot level as a star, and the `gmp0` population (the gmp
recipe unpruned, other seeds) as the dashed floor of two independent uncompressed populations.

Prints a short table per figure; the last line is one JSON object with the plotted numbers.
"""

import io
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from compax.analyses.hooker import draw_level_trends, level_families  # noqa: E402
from compax.paper import TABLE1_VARIANTS, seed_distribution, table1_row  # noqa: E402
from compax.report import table1_seeds  # noqa: E402

_TABLE1 = flags.DEFINE_list("table1", [], "Workdirs of finished runs with the Table 1 variants.")
_HOOKER = flags.DEFINE_string("hooker", None, "Workdir of a finished run of Hooker's design.")
_OUT = flags.DEFINE_string("out", "docs", "Where the PNGs go.")

DPI = 100
QUANTITIES = ("accuracy", *TABLE1_VARIANTS)
LABELS = {"accuracy": "accuracy", "pruned": "pruned", "w4a8": "w4a8", "w8a8": "w8a8",
          "pruned_w8a8": "pruned+w8a8"}
FAMILY_NAMES = {"l1_global": "one-shot (global L1)", "gmp": "gradual (gmp)"}
FLOOR = "gmp0"
CORRECTIONS = {None: "uncorrected", "holm": "Holm", "bonferroni": "Bonferroni",
               "fdr_bh": "Benjamini-Hochberg"}


def load(workdir) -> tuple[dict, dict]:
    """(results.json, config.json or {}) of a finished run."""
    workdir = pathlib.Path(workdir)
    config = workdir / "config.json"
    return (json.loads((workdir / "results.json").read_text()),
            json.loads(config.read_text()) if config.exists() else {})


def setting(config: dict, results: dict) -> str:
    """A run's setting in a few words: width, epochs and patience (config.json), searched level."""
    parts = []
    if config:
        parts.append(f"width {config['model_width']:g}, ≤{config['max_epochs']} epochs,"
                     f" patience {config['patience']}")
    amount = ((results["variants"].get("pruned") or {}).get("sparsity") or {}).get("amount")
    if isinstance(amount, int | float):
        parts.append(f"pruned at {amount:.2f}")
    return "; ".join(parts)


def table1_members(results: dict) -> dict:
    """{quantity: {"values": per-member figures, "paper": the paper's, "distribution":
    `seed_distribution` (None under 3 members)}} of one run: test accuracy in % ("accuracy") and
    each Table 1 variant's per-member Δ in pp (its accuracy minus its own original's)."""
    variants = results["variants"]
    base = 100 * np.asarray(variants["baseline"]["member_accuracy"], np.float64)
    paper = table1_row(results["model"]["name"], results["dataset"]["name"]) or {}
    columns = {"accuracy": (base, paper.get("accuracy"))}
    for v in TABLE1_VARIANTS:
        if v in variants:
            delta = 100 * np.asarray(variants[v]["member_accuracy"], np.float64) - base
            columns[v] = (delta, (paper.get("diff_pp") or {}).get(v))
    return {name: {"values": values.tolist(), "paper": figure,
                   "distribution": seed_distribution(values, figure)}
            for name, (values, figure) in columns.items()}


def table1_data(workdirs: list[str]) -> list[dict]:
    """One entry per (model, dataset) pair, in the order first found: {model, dataset, paper (the
    paper's row or None), runs: [{workdir, members, setting, pruned_percent (of all parameters),
    quantities (`table1_members`)}, ...]}."""
    pairs: dict = {}
    for workdir in workdirs:
        results, config = load(workdir)
        model, dataset = results["model"]["name"], results["dataset"]["name"]
        pair = pairs.setdefault((model, dataset), {"model": model, "dataset": dataset,
                                                   "paper": table1_row(model, dataset), "runs": []})
        sparsity = (results["variants"].get("pruned") or {}).get("sparsity") or {}
        fraction = sparsity.get("fraction_of_params")
        pair["runs"].append({
            "workdir": str(workdir), "members": len(results["variants"]["baseline"]["member_accuracy"]),
            "setting": setting(config, results),
            "pruned_percent": None if fraction is None else 100 * fraction,
            "quantities": table1_members(results)})
    return list(pairs.values())


def hooker_data(results: dict) -> dict:
    """{families: {label: [(sparsity, impacted classes, CIEs), ...]} (`level_families`, gmp0
    included at level 0), floor: (impacted, CIEs) of gmp0 or None, searched: (level, impacted,
    CIEs) of `pruned` or None, correction, alpha, members}."""
    variants = results["variants"]
    families = {FAMILY_NAMES.get(label, label): points
                for label, points in level_families(variants).items()}
    cie = {name: c for name, v in variants.items() if (c := (v.get("hooker") or {}).get("cie"))}
    floor = cie.get(FLOOR)
    pruned = variants.get("pruned") or {}
    amount = (pruned.get("sparsity") or {}).get("amount")
    searched = ((float(amount), cie["pruned"]["count"], cie["pruned"]["pies"])
                if "pruned" in cie and isinstance(amount, int | float) else None)
    cies = list(cie.values())
    return {"families": families, "floor": (floor["count"], floor["pies"]) if floor else None,
            "searched": searched, "correction": cies[0].get("correction") if cies else None,
            "alpha": cies[0].get("alpha") if cies else None,
            "members": len(variants["baseline"]["member_accuracy"])}


def save_small(fig, path: pathlib.Path, dpi: int = DPI) -> pathlib.Path:
    """The figure as a PNG of 256 colours at most (a third of the bytes, the same look)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    plt.close(fig)
    image = Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)
    return path


def plot_table1(pairs: list[dict], path: pathlib.Path) -> pathlib.Path:
    """Accuracy and the four Δs per pair: members as dots, mean ± std, 95% range, the paper."""
    fig, axes = plt.subplots(len(pairs), 2, figsize=(9, 0.4 + 2.9 * len(pairs)), squeeze=False,
                             width_ratios=(1, 3.2), layout="constrained")
    rng = np.random.default_rng(0)  # jitter of the dots only
    for (ax_acc, ax_diff), pair in zip(axes, pairs, strict=True):
        runs = pair["runs"]
        width = 0.7 / len(runs)
        for r, run in enumerate(runs):
            colour = f"C{r}"
            for i, name in enumerate(QUANTITIES):
                q = run["quantities"].get(name)
                if q is None:
                    continue
                ax = ax_acc if name == "accuracy" else ax_diff
                x = (0 if name == "accuracy" else i - 1) + (r - (len(runs) - 1) / 2) * width
                values = np.asarray(q["values"])
                ax.plot(x + rng.uniform(-0.12, 0.12, len(values)) * width, values, ".", ms=4,
                        color=colour, alpha=0.6)
                d = q["distribution"]
                if d is not None:
                    ax.vlines(x + 0.3 * width, d["low"], d["high"], color=colour, lw=1)
                    ax.vlines(x + 0.3 * width, d["mean"] - d["std"], d["mean"] + d["std"],
                              color=colour, lw=5, alpha=0.8)
                ax.plot(x + 0.3 * width, values.mean(), "_", color="black", ms=10, mew=1.5)
            pruned = run["pruned_percent"]
            ax_diff.plot([], [], ".", color=colour, ms=8,
                         label=f"{pathlib.Path(run['workdir']).name}: {run['members']} members"
                               + (f", {run['setting']}" if run["setting"] else "")
                               + (f" ({pruned:.1f}% of params)" if pruned is not None else ""))
        paper = pair["paper"]
        if paper:
            ax_acc.plot(0, paper["accuracy"], "D", color="C3", ms=7, mec="black", zorder=5)
            ax_diff.plot(range(len(TABLE1_VARIANTS)), [paper["diff_pp"][v] for v in TABLE1_VARIANTS],
                         "D", color="C3", ms=7, mec="black", zorder=5,
                         label=f"Schwaiger et al. 2022 ({paper['pruned_percent']}% pruned)")
        ax_diff.axhline(0, color="grey", lw=0.5)
        ax_acc.set_xticks([0], ["uncompressed"])
        ax_acc.set(xlim=(-0.6, 0.6), ylabel="test accuracy (%)", title="accuracy")
        ax_diff.set_xticks(range(len(TABLE1_VARIANTS)), [LABELS[v] for v in TABLE1_VARIANTS])
        ax_diff.set(xlim=(-0.6, len(TABLE1_VARIANTS) - 0.4), ylabel="Δ accuracy (pp)",
                    title=f"{pair['model']} on {pair['dataset']}: each member's Δ against its own"
                          " original")
        ax_diff.title.set_fontsize(10)
        ax_diff.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.1), frameon=False)
    fig.suptitle("Table 1 over seeds: members (dots), mean (black), mean ± std (thick bar),"
                 " central 95% (thin bar), the paper (red diamond)", fontsize=9)
    return save_small(fig, path)


def plot_hooker(data: dict, path: pathlib.Path) -> pathlib.Path:
    """Impacted classes and CIEs against sparsity: one-shot and gradual on the same axes."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), layout="constrained")
    correction = CORRECTIONS.get(data["correction"], data["correction"])
    floor = (None if data["floor"] is None
             else (f"{FLOOR}: gmp unpruned, other seeds (floor)", *data["floor"]))
    draw_level_trends(axes, data["families"], floor=floor,
                      impacted_title=f"Impacted classes (Welch, {correction}, α {data['alpha']:g})")
    if data["searched"] is not None:
        level, impacted, cies = data["searched"]
        one_shot = list(data["families"]).index(FAMILY_NAMES["l1_global"]) \
            if FAMILY_NAMES["l1_global"] in data["families"] else 0
        for ax, value in zip(axes, (impacted, cies), strict=True):
            ax.plot(level, value, "*", color=f"C{one_shot}", ms=11, mec="black",
                    label=f"pruned (searched {level:.2f})")
        axes[1].legend(fontsize=7)
    cies = [p[2] for points in data["families"].values() for p in points]
    cies += [data[k][-1] for k in ("floor", "searched") if data[k] is not None]
    if cies and min(cies) > 0 and max(cies) / min(cies) > 8:  # e.g. one-shot 0.9 far above the rest
        axes[1].set_yscale("log")
        axes[1].yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        axes[1].yaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
        axes[1].yaxis.set_minor_formatter(ticker.NullFormatter())
        axes[1].set_title("CIEs / PIEs (log scale)")
    for ax in axes:
        if ax.get_yscale() == "linear":  # from 0, the markers at 0 whole
            ax.set_ylim(bottom=-0.04 * ax.get_ylim()[1])
        ax.set_xlabel("sparsity (share of weights pruned)")
    axes[0].yaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"Hooker et al.'s design, {data['members']} members per population: gradual"
                 " populations trained apart, one-shot = the baseline's members pruned", fontsize=9)
    return save_small(fig, path)


def main(argv):
    del argv
    if not _TABLE1.value and not _HOOKER.value:
        raise app.UsageError("give --table1=WORKDIR[,WORKDIR...] and/or --hooker=WORKDIR")
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    if _TABLE1.value:
        pairs = table1_data(_TABLE1.value)
        plot_table1(pairs, out / "table1_seed_ranges.png")
        for workdir in _TABLE1.value:
            results, _ = load(workdir)
            seeds = table1_seeds(results)
            print(f"{workdir}: Table 1 over the members\n\n"
                  + (seeds.markdown() if seeds else "(fewer than 3 members)") + "\n")
        summary["table1"] = {"png": str(out / "table1_seed_ranges.png"), "pairs": pairs}
    if _HOOKER.value:
        data = hooker_data(load(_HOOKER.value)[0])
        if not data["families"]:
            raise app.UsageError(f"{_HOOKER.value} has no pruning levels with Hooker's analysis (2+"
                                 " members, 2+ fixed levels of one recipe, analysis hooker)")
        plot_hooker(data, out / "hooker_levels.png")
        print(f"{_HOOKER.value}: impacted classes (Welch, {data['correction']}) / CIEs per level\n")
        print("| family | " + " | ".join(["level", "impacted", "CIEs"]) + " |\n|---|---|---|---|")
        for label, points in data["families"].items():
            for level, impacted, cies in points:
                print(f"| {label} | {level:g} | {impacted} | {cies} |")
        if data["searched"]:
            print("| pruned (searched) | {:.2f} | {} | {} |".format(*data["searched"]))
        if data["floor"]:
            print("| {} floor | 0 | {} | {} |".format(FLOOR, *data["floor"]))
        summary["hooker"] = {"png": str(out / "hooker_levels.png"), **data}
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
