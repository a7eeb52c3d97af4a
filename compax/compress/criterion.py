"""Pruning criteria: a criterion writes only its scores; selection, keys and data are shared.

As in jaxpruner (a criterion's `calculate_scores(params, sparse_state, grads)`), a pruning step is
a `PruningStep` subclass that declares what it needs and scores each kernel entry; the shared
selection (`compax.compress.selection`) turns the scores into masks at the step's `amount` and
`scope` (global, per layer, per filter), skips the kernels matching `exclude`, prunes exactly
round(amount * n) units and breaks ties by the lower index. The masked entries are set to zero;
no fine-tuning.

`scores(params, *, key=None, data=None, grads=None)` gets one member's params and returns a pytree
of their structure with a non-negative float32 score per entry of every conv and dense kernel (any
value elsewhere: other leaves are not selected); low scores are pruned first. It is pure: the
population engine vmaps it over the members. It gets, as its `needs` class variable lists:

    "key"    a PRNG key per member: fold_in(key(run seed), member index), so members differ and
             the same run seed gives the same masks
    "data"   the calibration batch (normalised images, integer labels): `batch` of the run's
             calibration images spread evenly through them (`Context.calibration_batch`), a
             setting of the step (default 128)
    "grads"  ∂L/∂params of the mean cross-entropy L of the member (evaluation mode: BatchNorm with
             its running statistics) on that batch

`amount` is a fraction in [0, 1) or `searched`: the largest level of the grid (`compress.
sparsity_step`) whose population-mean validation accuracy under *this* criterion and scope stays
within `compress.sparsity_tolerance_pp` of the original's (Schwaiger et al. 2022; `Context.
searched_sparsity`, searched once per criterion and settings per run: the scores are computed once
per member, then every level is one vmapped selection). `exclude`: a regular expression of kernel
paths kept dense, default `compress.prune_exclude` (filled in when the recipe is parsed).

A new criterion is one module, plus its import in `compax/registrations.py`:

    @register_step
    @dataclasses.dataclass(frozen=True)
    class Saliency(PruningStep):
        \"\"\"|w · ∂L/∂w|, first-order Taylor (Molchanov et al. 2017).\"\"\"

        name: ClassVar[str] = "saliency"
        needs: ClassVar[frozenset] = frozenset({"grads"})
        scope: str = "global"
        batch: int = 128

        def scores(self, params, *, grads, **_):
            return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)

Used as `saliency(amount=0.5,scope=layer)` in a recipe. A criterion's `scope` is a field (the
recipe chooses) or a class variable (fixed, as `l1_global`'s).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compax.compress.prune import apply_masks
from compax.compress.registry import Context, Step, Variant
from compax.compress.selection import check_scope, select_masks
from compax.compress.sparsity import sparsity_report
from compax.errors import UserError
from compax.member_vmap import chunked_vmap, take_members

NEEDS = frozenset({"key", "data", "grads"})


def loss_gradients(model, variables, images, labels):
    """∂L/∂params of the mean cross-entropy of `model` (evaluation mode) on one batch."""
    def loss(params):
        logits = model.apply({**variables, "params": params}, images, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return jax.grad(loss)(variables["params"])


@dataclasses.dataclass(frozen=True)
class PruningStep(Step):
    """Masks from a criterion's `scores` (module doc), applied to every member; reports the
    sparsity. Subclasses set `name`, `needs` and `scope` and write `scores`."""

    amount: float | str = "searched"
    exclude: str | None = None
    prunes: ClassVar[bool] = True
    needs: ClassVar[frozenset] = frozenset()
    config_defaults: ClassVar[dict[str, str]] = {"exclude": "compress.prune_exclude"}

    def __post_init__(self):
        if self.amount != "searched" and not (isinstance(self.amount, int | float)
                                              and 0 <= self.amount < 1):
            raise UserError(f"{self.name}: amount must be a fraction in [0, 1) or 'searched',"
                            f" got {self.amount!r}")
        check_scope(self.scope, self.name)
        if not self.needs <= NEEDS:
            raise ValueError(f"{self.name}: needs {set(self.needs - NEEDS)}; choose from {set(NEEDS)}")
        if self.needs & {"data", "grads"} and not (isinstance(self.batch, int) and self.batch >= 1):
            raise UserError(f"{self.name}: batch must be an integer >= 1, got {self.batch!r}")

    def scores(self, params, *, key=None, data=None, grads=None):
        """One member's non-negative scores per kernel entry (module doc); lowest pruned first."""
        raise NotImplementedError

    def search_key(self) -> str:
        """The criterion with its settings, without the amount: names its level search."""
        settings = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                            if f.name != "amount")
        return f"{self.name}({settings})"

    def inputs(self, ctx: Context) -> dict:
        """The arrays every member's scores share: the run's seed, the calibration batch."""
        shared = {}
        if "key" in self.needs:
            shared["seed"] = jnp.asarray(ctx.seed, jnp.int32)
        if self.needs & {"data", "grads"}:
            shared["data"] = ctx.calibration_batch(self.batch, self.name)
        return shared

    def member_scores(self, model, variables, member, shared: dict):
        """`scores` of one member (its variables and index) with what it needs; pure."""
        given = {}
        if "key" in self.needs:
            given["key"] = jax.random.fold_in(jax.random.key(shared["seed"]), member)
        if "data" in self.needs:
            given["data"] = shared["data"]
        if "grads" in self.needs:
            given["grads"] = loss_gradients(model, variables, *shared["data"])
        return self.scores(variables["params"], **given)

    def member_masks(self, model, variables, member, shared: dict, amount):
        """One member's masks (True = kept) at `amount`."""
        scores = self.member_scores(model, variables, member, shared)
        return select_masks(scores, amount, scope=self.scope, exclude=self.exclude)

    def __call__(self, variant: Variant, ctx: Context) -> Variant:
        if ctx.abstract:  # pruning keeps every shape
            return Variant(variant.model, variant.compressed, dict(variant.info))
        variables = variant.compressed.variables
        if ctx.masks is not None:  # given masks (compress's single-model API): one member
            amount = None
            masks = jax.tree.map(lambda m: None if m is None else m[None], ctx.masks,
                                 is_leaf=lambda m: m is None)
        else:
            if self.needs & {"data", "grads"} and (variant.compressed.qstate is not None
                                                   or variant.compressed.dtype != "float32"):
                raise UserError(f"{self.name} takes gradients of a float32 model: put it before"
                                " quantize or cast in the recipe")
            amount = ctx.searched_sparsity(self) if self.amount == "searched" else float(self.amount)
            model, shared = variant.model, self.inputs(ctx)
            members = jnp.arange(jax.tree.leaves(variables)[0].shape[0], dtype=jnp.int32)
            masks = chunked_vmap(lambda v, i, s: self.member_masks(model, v, i, s, amount),
                                 ctx.chunk, num_member_args=2)(variables, members, shared)
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
