"""Drawing primitives of the report's figures: PNG files of `matplotlib.figure.Figure`s.

The figures are plain `Figure`s that pyplot does not manage: no backend is chosen or changed,
nothing opens a window or shows up inline in a notebook that imports compax, and nothing needs
closing. matplotlib is imported when the first figure is drawn, so that the analyses, which name
their figures, import without it. Each analysis draws its own figures (`compax/analyses`); what
they share is here.
"""

import pathlib

import numpy as np

DPI = 110


def subplots(*grid, figsize=None, layout=None, **options):
    """(figure, axes) as `matplotlib.pyplot.subplots` gives them, on a `Figure` of its own."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **options)


def save(fig, directory: pathlib.Path, name: str) -> str:
    """Writes `fig` as `directory/name` (PNG); returns `name`."""
    fig.savefig(directory / name, dpi=DPI, bbox_inches="tight")
    return name


def class_colour(index: int):
    """The colour of the `index`-th class in a scatter plot (tab10, cycled)."""
    import matplotlib

    return matplotlib.colormaps["tab10"](index % 10)


def compressed_variants(results: dict) -> list[str]:
    """The names in `results` ({variant: ...}) but the original population's."""
    return [name for name in results if name != "baseline"]


def variants_with(arrays: dict, key: str) -> list[str]:
    """The compressed variants, in order, that have the array `key` in `arrays` (an analysis's
    arrays, keyed "<variant>.<key>")."""
    return [name for name in dict.fromkeys(k.rsplit(".", 1)[0] for k in arrays)
            if name != "baseline" and f"{name}.{key}" in arrays]


def grouped_bars(directory, name, series: dict, class_names, ylabel: str, title: str) -> str:
    """One bar per class and series (variant), side by side."""
    fig, ax = subplots(figsize=(max(6, 0.22 * len(class_names) * len(series) ** 0.5), 3.5))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar(np.arange(len(class_names)) + i * width, values, width, label=label)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(np.arange(len(class_names)) + 0.4, class_names, rotation=90, fontsize=6)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=7, ncol=4)
    return save(fig, directory, name)


def example_images(directory, images, index, name, titles=None, columns=10) -> str | None:
    """A grid of the test `images` at `index` (e.g. the CIEs), at most three rows."""
    if len(index) == 0:
        return None
    index = index[:columns * 3]
    rows = -(-len(index) // columns)
    fig, axes = subplots(rows, columns, figsize=(1.1 * columns, 1.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(index):
        ax = axes[k // columns][k % columns]
        ax.imshow(images[i])
        if titles is not None:
            ax.set_title(titles[k], fontsize=5)
    return save(fig, directory, name)


def population_spread(directory, values: dict, label: str, name: str) -> str | None:
    """Per-member values ({variant: list}) as points with their mean ± std, one column each."""
    rows = [(v, np.asarray(x, float)) for v, x in values.items() if isinstance(x, list) and x]
    if not rows:
        return None
    fig, ax = subplots(figsize=(max(4, 0.8 * len(rows)), 3))
    for i, (_, x) in enumerate(rows):
        ax.plot(np.full(len(x), i), x, ".", color="grey", ms=4)
        ax.errorbar(i, np.nanmean(x), np.nanstd(x), fmt="o", color="C3", capsize=4)
    ax.set_xticks(range(len(rows)), [v for v, _ in rows], rotation=45, ha="right", fontsize=7)
    ax.set(ylabel=label, title=f"{label} per member (mean ± std)")
    return save(fig, directory, name)
