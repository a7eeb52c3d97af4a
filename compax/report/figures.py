"""The studies' figures as PNG files, drawn from results.json and analysis/arrays.npz only.

Each function draws one figure into `directory` and returns its file name, or None when the run
has no data for it (the analysis was not enabled). Nothing here computes an analysis.
"""

import pathlib

import matplotlib
import numpy as np
from matplotlib.figure import Figure

DPI = 110


def _subplots(*grid, figsize=None, layout=None, **options):
    """(figure, axes) as `matplotlib.pyplot.subplots` gives them, on a `Figure` that pyplot does
    not manage: no backend is chosen or changed, nothing opens a window or shows up inline in a
    notebook that imports compax, and nothing needs closing."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **options)


def _save(fig, directory: pathlib.Path, name: str) -> str:
    fig.savefig(directory / name, dpi=DPI, bbox_inches="tight")
    return name


def compressed_variants(results: dict) -> list[str]:
    return [name for name in results["variants"] if name != "baseline"]


def sparsity_search(directory, results) -> str | None:
    """Population-mean validation accuracy over pruning levels, with the chosen level."""
    search = results.get("sparsity_search")
    if not search:
        return None
    fig, ax = _subplots(figsize=(6, 3.5))
    ax.plot(100 * np.asarray(search["levels"]), 100 * np.asarray(search["val_accuracy"]), "-")
    ax.axhline(100 * search["baseline_val_accuracy"], color="grey", ls="--", label="uncompressed")
    ax.axhline(100 * search["baseline_val_accuracy"] - search["tolerance_pp"], color="grey", ls=":",
               label=f"tolerance {search['tolerance_pp']} pp")
    ax.axvline(100 * search["chosen"], color="C3", label=f"chosen {100 * search['chosen']:.0f}%")
    ax.set(xlabel="pruned share of weights (%)", ylabel="validation accuracy (%)",
           title="Global L1 pruning without fine-tuning")
    ax.legend(fontsize=8)
    return _save(fig, directory, "sparsity_search.png")


def confusion_change(directory, arrays, variant, class_names) -> str | None:
    """Row-normalised confusion matrix of `variant` minus the original's, in pp (Schwaiger Fig. 1)."""
    key = f"{variant}.confusion_change_pp"
    if key not in arrays:
        return None
    change = arrays[key]
    limit = max(float(np.abs(change).max()), 0.1)
    size = 3 + 0.14 * len(class_names)
    fig, ax = _subplots(figsize=(size, size * 0.85))
    image = ax.imshow(change, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"{variant}: confusion change (pp)")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=6)
    ax.set_yticks(ticks, class_names, fontsize=6)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, directory, f"confusion_change_{variant}.png")


def _grouped_bars(directory, name, series: dict, class_names, ylabel: str, title: str) -> str:
    """One bar per class and series (variant), side by side."""
    fig, ax = _subplots(figsize=(max(6, 0.22 * len(class_names) * len(series) ** 0.5), 3.5))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar(np.arange(len(class_names)) + i * width, values, width, label=label)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(np.arange(len(class_names)) + 0.4, class_names, rotation=90, fontsize=6)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=7, ncol=4)
    return _save(fig, directory, name)


def class_accuracy_change(directory, results, arrays, class_names) -> str | None:
    """Change of every class's accuracy, per variant (pp)."""
    series = {v: arrays[f"{v}.class_accuracy_change_pp"] for v in compressed_variants(results)
              if f"{v}.class_accuracy_change_pp" in arrays}
    if not series:
        return None
    return _grouped_bars(directory, "class_accuracy_change.png", series, class_names,
                         "class accuracy change (pp)", "Class accuracy, compressed - original")


def confidence_histograms(directory, results, arrays) -> str | None:
    """Target-class confidence change, same vs different prediction (Schwaiger Figs. 2-3)."""
    variants = [v for v in compressed_variants(results) if f"{v}.confidence_diff" in arrays]
    if not variants:
        return None
    fig, axes = _subplots(1, len(variants), figsize=(3.2 * len(variants), 3), squeeze=False)
    bins = np.linspace(-1, 1, 41)
    for ax, v in zip(axes[0], variants, strict=True):
        diff, same = arrays[f"{v}.confidence_diff"], arrays[f"{v}.same_prediction"].astype(bool)
        ax.hist(diff[same], bins, alpha=0.7, label=f"same ({same.sum()})", log=True)
        ax.hist(diff[~same], bins, alpha=0.7, label=f"different ({(~same).sum()})", log=True)
        ax.set(title=v, xlabel="confidence change")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test samples")
    return _save(fig, directory, "confidence_change.png")


def reliability(directory, results, arrays) -> str | None:
    """Reliability diagrams: accuracy over confidence bins, original and each variant."""
    names = [v for v in results["variants"] if f"{v}.reliability_accuracy" in arrays]
    if not names:
        return None
    fig, axes = _subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    for ax, v in zip(axes[0], names, strict=True):
        accuracy, confidence = arrays[f"{v}.reliability_accuracy"], arrays[f"{v}.reliability_confidence"]
        count = arrays[f"{v}.reliability_count"]
        edges = np.linspace(0, 1, len(accuracy) + 1)
        ax.bar(edges[:-1], np.where(count > 0, accuracy, 0), 1 / len(accuracy), align="edge",
               edgecolor="black", lw=0.3)
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.plot(confidence[count > 0], accuracy[count > 0], ".", color="C3", ms=3)
        ece = results["variants"][v].get("ece")
        ax.set(title=f"{v}" + (f"\nECE {ece:.3f}" if ece is not None else ""), xlabel="confidence")
    axes[0][0].set_ylabel("accuracy")
    return _save(fig, directory, "reliability.png")


def mad_distribution(directory, results, arrays, method="saliency") -> str | None:
    """Distribution of the per-sample MAD of the 3x3-pooled maps (Schwaiger Fig. 5)."""
    variants = [v for v in compressed_variants(results) if f"{v}.{method}_mad" in arrays]
    if not variants:
        return None
    fig, ax = _subplots(figsize=(6, 3.5))
    top = max(float(arrays[f"{v}.{method}_mad"].max()) for v in variants)
    bins = np.linspace(0, max(top, 1e-3), 50)
    for v in variants:
        ax.hist(arrays[f"{v}.{method}_mad"], bins, histtype="step", lw=1.2, label=v)
    ax.set(xlabel="MAD of 3x3-pooled maps", ylabel="test samples", yscale="log",
           title=f"{'Saliency' if method == 'saliency' else 'Grad-CAM'} change per sample")
    ax.legend(fontsize=7)
    return _save(fig, directory, f"{method}_mad.png")


def attention_grid(directory, arrays, variant, images, method="saliency", columns=10) -> str | None:
    """The most changed samples: image, original map, compressed map (Schwaiger Fig. 4)."""
    key = f"{variant}.{method}_most_changed"
    if key not in arrays:
        return None
    index = arrays[key]
    original, compressed = arrays[f"{variant}.{method}_maps_original"], arrays[f"{variant}.{method}_maps"]
    mad = arrays[f"{variant}.{method}_mad"]
    order = np.argsort(-mad, kind="stable")[:len(index)]
    n = len(index)
    columns = min(columns, n)
    blocks = -(-n // columns)
    fig, axes = _subplots(3 * blocks, columns, figsize=(1.3 * columns, 1.35 * 3 * blocks),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(n):
        row, col = 3 * (k // columns), k % columns
        axes[row][col].imshow(images[index[k]])
        axes[row][col].set_title(f"MAD {mad[order[k]]:.3f}", fontsize=6)
        axes[row + 1][col].imshow(original[k], cmap="inferno", vmin=0, vmax=1)
        axes[row + 2][col].imshow(compressed[k], cmap="inferno", vmin=0, vmax=1)
    axes[1][0].text(-0.1, 0.5, "original", transform=axes[1][0].transAxes, rotation=90,
                    ha="right", va="center", fontsize=7)
    axes[2][0].text(-0.1, 0.5, variant, transform=axes[2][0].transAxes, rotation=90,
                    ha="right", va="center", fontsize=7)
    fig.suptitle(f"{method}: the {n} most changed test samples ({variant})", fontsize=9)
    return _save(fig, directory, f"{method}_most_changed_{variant}.png")


def attention_side_by_side(directory, results, arrays, images, method="saliency") -> str | None:
    """The same test samples under the original and every variant (original / pruned / quantized)."""
    names = [v for v in results["variants"] if f"{v}.{method}_showcase" in arrays]
    if len(names) < 2:
        return None
    index = arrays[f"baseline.{method}_showcase_index"]
    fig, axes = _subplots(len(index), len(names) + 1,
                             figsize=(1.25 * (len(names) + 1), 1.3 * len(index)), squeeze=False)
    for r, i in enumerate(index):
        axes[r][0].imshow(images[i])
        for c, name in enumerate(names, start=1):
            axes[r][c].imshow(arrays[f"{name}.{method}_showcase"][r], cmap="inferno", vmin=0, vmax=1)
            if r == 0:
                axes[r][c].set_title("original" if name == "baseline" else name, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, directory, f"{method}_side_by_side.png")


def tsne(directory, results, arrays, class_names) -> str | None:
    """t-SNE of penultimate embeddings per variant, with the silhouette score (Zee et al.)."""
    names = [v for v in results["variants"] if f"{v}.tsne" in arrays]
    if not names:
        return None
    fig, axes = _subplots(1, len(names), figsize=(3 * len(names), 3), squeeze=False)
    for ax, v in zip(axes[0], names, strict=True):
        xy, labels = arrays[f"{v}.tsne"], arrays[f"{v}.tsne_labels"]
        for j, c in enumerate(np.unique(labels)):
            keep = labels == c
            ax.scatter(xy[keep, 0], xy[keep, 1], s=3, color=matplotlib.colormaps["tab10"](j % 10),
                       label=class_names[c])
        score = results["variants"][v].get("tsne_silhouette")
        ax.set(title=f"{v}" + (f"\nsilhouette {score:.3f}" if score is not None else ""),
               xticks=[], yticks=[])
    axes[0][-1].legend(fontsize=5, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    return _save(fig, directory, "tsne.png")


def cie_bars(directory, results, arrays, class_names) -> str | None:
    """Compression identified exemplars per class, per variant (Hooker et al.)."""
    series = {f"{v} ({int(arrays[f'{v}.cie_per_class'].sum())})": arrays[f"{v}.cie_per_class"]
              for v in compressed_variants(results) if f"{v}.cie_per_class" in arrays}
    if not series:
        return None
    return _grouped_bars(directory, "cie_per_class.png", series, class_names, "CIEs (test samples)",
                         "Compression identified exemplars per true class")


def example_images(directory, images, index, name, titles=None, columns=10) -> str | None:
    """A grid of test images (e.g. the CIEs)."""
    if len(index) == 0:
        return None
    index = index[:columns * 3]
    rows = -(-len(index) // columns)
    fig, axes = _subplots(rows, columns, figsize=(1.1 * columns, 1.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(index):
        ax = axes[k // columns][k % columns]
        ax.imshow(images[i])
        if titles is not None:
            ax.set_title(titles[k], fontsize=5)
    return _save(fig, directory, name)


def class_metric_change(directory, results, arrays, class_names, metric="f1") -> str | None:
    """Change of every class's precision, recall or F1 (member means), per variant."""
    base = arrays.get(f"baseline.class_{metric}")
    series = {v: arrays[f"{v}.class_{metric}"] - base for v in compressed_variants(results)
              if base is not None and f"{v}.class_{metric}" in arrays}
    if not series:
        return None
    return _grouped_bars(directory, f"class_{metric}_change.png", series, class_names,
                         f"{metric} change", f"Per-class {metric}, compressed - original")


def population_spread(directory, results, key: str, label: str, name: str) -> str | None:
    """Per-member values of `key` (a list per variant in results) as points with mean ± std."""
    rows = [(v, np.asarray(r[key], float)) for v, r in results["variants"].items()
            if isinstance(r.get(key), list) and r[key]]
    if not rows:
        return None
    fig, ax = _subplots(figsize=(max(4, 0.8 * len(rows)), 3))
    for i, (_, values) in enumerate(rows):
        ax.plot(np.full(len(values), i), values, ".", color="grey", ms=4)
        ax.errorbar(i, np.nanmean(values), np.nanstd(values), fmt="o", color="C3", capsize=4)
    ax.set_xticks(range(len(rows)), [v for v, _ in rows], rotation=45, ha="right", fontsize=7)
    ax.set(ylabel=label, title=f"{label} per member (mean ± std)")
    return _save(fig, directory, name)


def level_trends(directory, families: dict) -> str | None:
    """Impacted classes and CIEs against the compression level, one line per family of variants
    (Hooker et al.'s figures: e.g. one-shot and gradual pruning on one plot). `families`:
    {label: [(level, impacted classes, CIEs), ...]} sorted by level."""
    families = {label: points for label, points in families.items() if len(points) >= 2}
    if not families:
        return None
    fig, axes = _subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    draw_level_trends(axes, families)
    return _save(fig, directory, "level_trends.png")


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
    fig, axes = _subplots(1, 2, figsize=(max(6, 0.9 * len(names)), 3.2))
    for ax, (a, b), title in ((axes[0], (0, 1), "original accuracy"),
                              (axes[1], (2, 3), "accuracy drop after compression")):
        ax.bar(x - 0.2, 100 * values[:, a], 0.4, label="on CIEs")
        ax.bar(x + 0.2, 100 * values[:, b], 0.4, label="on the rest")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel="%", title=title)
    axes[0].legend(fontsize=7)
    return _save(fig, directory, "pie_accuracy.png")
