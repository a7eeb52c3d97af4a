"""Filter pruning with the filters physically removed, as a recipe step: `filters(amount, exclude)`.

Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017): in every prunable conv / dense
layer with C output channels the round(amount * C) filters of smallest L1 norm sum |W[..., c]| are
removed with their biases, BatchNorm entries and the next layers' inputs, giving a smaller dense
model (`compax.compress.shrink`, which finds the channel dependencies by probing the model: residual
sums stay whole, the classifier is never pruned). Every member keeps the same number of channels per
layer, so the population stays one pytree. No fine-tuning. The step reports, under "structure",
the channels before and after per layer and the parameters and multiply-adds before and after.
"""

import dataclasses
from typing import ClassVar

import jax

from compax.compress.registry import Context, Step, Variant, register_step
from compax.compress.shrink import Shrunk, shrink
from compax.errors import UserError
from compax.member_vmap import chunked_vmap, take_members


@register_step
@dataclasses.dataclass(frozen=True)
class Filters(Step):
    """Per-layer L1 filter pruning, filters removed (module doc)."""

    name: ClassVar[str] = "filters"
    amount: float = 0.25
    exclude: str | None = None

    def __post_init__(self):
        if not isinstance(self.amount, int | float) or not 0 <= self.amount < 1:
            raise UserError(f"filters: amount must be a fraction in [0, 1), got {self.amount!r}")

    def __call__(self, variant: Variant, ctx: Context) -> Variant:
        compressed = variant.compressed
        if compressed.qstate is not None or compressed.dtype != "float32":
            raise UserError("filters removes channels of a float32 model: put it before quantize"
                            " or cast in the recipe")
        model, amount, exclude = variant.model, float(self.amount), self.exclude

        def member(v):
            return shrink(model, v, amount, exclude=exclude)[0]

        variables = compressed.variables
        info = dict(variant.info)
        if ctx.abstract:
            small = jax.eval_shape(jax.vmap(member), variables)
        else:
            small = chunked_vmap(member, ctx.chunk, num_member_args=1)(variables)
            info["structure"] = jax.eval_shape(
                lambda v: shrink(model, v, amount, exclude=exclude), take_members(variables, 0))[1].as_dict()
        return Variant(Shrunk(model), compressed.replace(variables=small), info)
