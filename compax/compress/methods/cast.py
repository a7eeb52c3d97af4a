"""Half precision as a recipe step: `cast(dtype)` with dtype float16 or bfloat16.

Weights (and BatchNorm statistics) are stored in `dtype` and the forward pass computes in it, as
Hooker's thesis evaluates float16 (Micikevicius et al. 2018, "Mixed Precision Training": IEEE
binary16 has a 10-bit mantissa, bfloat16 a 7-bit one with float32's exponent range).
"""

import dataclasses
from typing import ClassVar

import jax

from compax.compress.compressed import FLOAT_TYPES, Compressed
from compax.compress.registry import MemberStep, register_step
from compax.errors import UserError


@register_step
@dataclasses.dataclass(frozen=True)
class Cast(MemberStep):
    """Every variable in `dtype`; computation in `dtype`."""

    name: ClassVar[str] = "cast"
    dtype: str = "float16"

    def __post_init__(self):
        if self.dtype not in ("float16", "bfloat16"):
            raise UserError(f"cast: dtype must be float16 or bfloat16, got {self.dtype!r}")

    def shared(self, variant, ctx) -> tuple:
        if variant.compressed.qstate is not None:
            raise UserError("cast cannot follow quantize in a recipe: cast a float32 model")
        return ()

    def member(self, model, compressed, *, ctx):
        variables = jax.tree.map(lambda a: a.astype(FLOAT_TYPES[self.dtype]), compressed.variables)
        return Compressed(variables, None, weight_bits=16, activation_bits=16, dtype=self.dtype)
