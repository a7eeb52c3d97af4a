"""Half-precision storage as a recipe step: `half_storage(dtype)` with dtype float16 or bfloat16.

TFLite's float16 quantization as Hooker's thesis ran it on the CPU: every float weight (biases and
BatchNorm parameters and statistics included) is stored in `dtype` (round to nearest even) and
dequantized to float32 when the model runs, which then computes in float32. The variables keep
float32 arrays holding the `dtype` values (as quantized weights keep their integer grid in
float32), so the model computes exactly as TFLite's float32 kernels on dequantized weights; sizes
count 16 bits per value (`Compressed.storage_dtype`). `cast` instead computes in half precision.
TFLite's converter folds BatchNorm into the convolution before casting; here BatchNorm is cast
unfolded (LeNet-5 has none).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from compax.compress.compressed import FLOAT_TYPES, Compressed
from compax.compress.registry import MemberStep, register_step
from compax.errors import UserError


@register_step
@dataclasses.dataclass(frozen=True)
class HalfStorage(MemberStep):
    """Every variable rounded to `dtype` and stored in it; computation in float32."""

    name: ClassVar[str] = "half_storage"
    dtype: str = "float16"

    def __post_init__(self):
        if self.dtype not in ("float16", "bfloat16"):
            raise UserError(f"half_storage: dtype must be float16 or bfloat16, got {self.dtype!r}")

    def shared(self, variant, ctx) -> tuple:
        compressed = variant.compressed
        if compressed.qstate is not None or compressed.dtype != "float32":
            raise UserError("half_storage must act on a float32 model: put it before any quantize"
                            " or cast step in the recipe")
        return ()

    def member(self, model, compressed, *, ctx):
        variables = jax.tree.map(
            lambda a: a.astype(FLOAT_TYPES[self.dtype]).astype(jnp.float32)
            if jnp.issubdtype(a.dtype, jnp.floating) else a, compressed.variables)
        return Compressed(variables, None, weight_bits=16, activation_bits=32, dtype="float32",
                          storage_dtype=self.dtype)
