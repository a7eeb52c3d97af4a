"""The report's figures that belong to no analysis (the pruning level search), drawn from
results.json only; each analysis draws its own (`compax/analyses`), with `compax.plots`."""

import numpy as np

from compax import plots


def sparsity_search(directory, results) -> str | None:
    """Population-mean validation accuracy over pruning levels, with the chosen level, of the
    first criterion searched (results.json's `sparsity_search`)."""
    search = results.get("sparsity_search")
    if not search:
        return None
    fig, ax = plots.subplots(figsize=(6, 3.5))
    ax.plot(100 * np.asarray(search["levels"]), 100 * np.asarray(search["val_accuracy"]), "-")
    ax.axhline(100 * search["baseline_val_accuracy"], color="grey", ls="--", label="uncompressed")
    ax.axhline(100 * search["baseline_val_accuracy"] - search["tolerance_pp"], color="grey", ls=":",
               label=f"tolerance {search['tolerance_pp']} pp")
    ax.axvline(100 * search["chosen"], color="C3", label=f"chosen {100 * search['chosen']:.0f}%")
    ax.set(xlabel="pruned share of weights (%)", ylabel="validation accuracy (%)",
           title=f"{search.get('criterion', 'l1_global')} without fine-tuning")
    ax.legend(fontsize=8)
    return plots.save(fig, directory, "sparsity_search.png")
