"""Unstructured magnitude pruning as recipe steps: `l1_global` and `l1_layer`.

    l1_global(amount, exclude)   the `amount` of all conv and dense weights with the smallest |w|,
                                 ranked together: torch.nn.utils.prune.global_unstructured with
                                 L1Unstructured (Schwaiger et al. 2022; `prune.global_l1_masks`)
    l1_layer(amount, exclude)    round(amount * n) entries of smallest |w| in every kernel of n
                                 entries: torch.nn.utils.prune.l1_unstructured per layer
                                 (Han et al. 2015, "Learning both Weights and Connections")

`amount` is a fraction in [0, 1) or `searched`: the level of Schwaiger et al., the largest multiple
of `compress.sparsity_step` whose global-L1 validation accuracy (population mean) stays within
`compress.sparsity_tolerance_pp` of the original's (`compax.compress.sweep`). `exclude` is a regular
expression of kernel paths kept dense (default: `compress.prune_exclude`). Masked entries are set
to zero; no fine-tuning. A new criterion subclasses `PruningStep` and writes `masks`.
"""

import dataclasses
from typing import ClassVar

import jax
import numpy as np

from compax.compress.prune import apply_masks, global_l1_masks, layer_l1_masks
from compax.compress.registry import Context, Step, Variant, register_step
from compax.compress.sparsity import sparsity_report
from compax.errors import UserError
from compax.member_vmap import chunked_vmap, take_members


@dataclasses.dataclass(frozen=True)
class PruningStep(Step):
    """Masks from a criterion (`masks`), applied to every member; reports the sparsity."""

    amount: float | str = "searched"
    exclude: str | None = None
    prunes: ClassVar[bool] = True

    def __post_init__(self):
        if self.amount != "searched" and not (isinstance(self.amount, int | float)
                                              and 0 <= self.amount < 1):
            raise UserError(f"{self.name}: amount must be a fraction in [0, 1) or 'searched',"
                            f" got {self.amount!r}")

    def masks(self, params, amount: float, exclude: str | None):
        """Masks (True = kept) of one member's params at `amount` (a Python float)."""
        raise NotImplementedError

    def __call__(self, variant: Variant, ctx: Context) -> Variant:
        if ctx.abstract:  # pruning keeps every shape
            return Variant(variant.model, variant.compressed, dict(variant.info))
        exclude = self.exclude if self.exclude is not None else ctx.config.compress.prune_exclude
        variables = variant.compressed.variables
        if ctx.masks is not None:  # given masks (compress's single-model API): one member
            amount = None
            masks = jax.tree.map(lambda m: None if m is None else m[None], ctx.masks,
                                 is_leaf=lambda m: m is None)
        else:
            amount = ctx.searched_sparsity() if self.amount == "searched" else float(self.amount)
            masks = chunked_vmap(lambda p: self.masks(p, amount, exclude), ctx.chunk,
                                 num_member_args=1)(variables["params"])
        pruned = chunked_vmap(lambda v, m: {**v, "params": apply_masks(v["params"], m)},
                              ctx.chunk, num_member_args=2)(variables, masks)
        info = {**variant.info,
                "sparsity": _population_sparsity(variables["params"], masks, amount)}
        return Variant(variant.model, variant.compressed.replace(variables=pruned), info)


def _population_sparsity(params, masks, amount: float) -> dict:
    """The pruned shares of `sparsity_report`, averaged over the members."""
    size = jax.tree.leaves(params)[0].shape[0]
    reports = [sparsity_report(take_members(params, i), take_members(masks, i))
               for i in range(size)]
    return {
        "amount": amount,
        "fraction_of_weights": float(np.mean([r["fraction_of_weights"] for r in reports])),
        "fraction_of_params": float(np.mean([r["fraction_of_params"] for r in reports])),
        "layers": {name: float(np.mean([r["layers"][name] for r in reports]))
                   for name in reports[0]["layers"]},
    }


@register_step
@dataclasses.dataclass(frozen=True)
class GlobalL1(PruningStep):
    """Global L1 unstructured pruning (torch's global_unstructured, L1Unstructured)."""

    name: ClassVar[str] = "l1_global"

    def masks(self, params, amount, exclude):
        return global_l1_masks(params, amount, exclude=exclude)


@register_step
@dataclasses.dataclass(frozen=True)
class LayerL1(PruningStep):
    """Per-layer L1 unstructured pruning (torch's l1_unstructured on every layer)."""

    name: ClassVar[str] = "l1_layer"

    def masks(self, params, amount, exclude):
        return layer_l1_masks(params, amount, exclude=exclude)
