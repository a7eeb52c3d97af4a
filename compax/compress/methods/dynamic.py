"""Dynamic quantization as a recipe step: `dynamic_quantize(weight_bits, activation_bits, layers,
reduce_range)`.

What `torch.ao.quantization.quantize_dynamic` runs with the fbgemm engine (and TFLite's
dynamic-range quantization, up to its input quantization): weights quantized once, per output
channel symmetric as in `quantize` (BatchNorm folded), no calibration; at run time the input of
every conv / dense layer (`layers=dense`: dense layers only, quantize_dynamic's default nn.Linear)
is quantized per tensor, from the min and max over the whole input of that call (all images of the
batch together, so a value depends on the batch it is evaluated in, as in PyTorch), asymmetric
uint8 with ATen's `ChooseQuantizationParams` for [0, 127] with reduce_range (fbgemm's default;
`reduce_range` defaults to `compress.reduce_range`, filled in when the recipe is parsed with the
run's config, `registry.Step.config_defaults`; parsed without one: True); the layer computes on the
quantized values and its output stays float. Fake-quantized through the jaxpr interpreter
(`compax.compress.ptq`), with the straight-through gradient; `int8_apply` runs the same layers in
integers.

TFLite's hybrid kernels differ in how they quantize the input (symmetric int8 per batch row by
default, asymmetric with `asymmetric_quantize_inputs`); this step follows PyTorch's.
"""

import dataclasses
from typing import ClassVar

import jax

from compax.compress.compressed import Compressed
from compax.compress.ptq import DYNAMIC_LAYERS, QuantConfig, ptq
from compax.compress.registry import Context, MemberStep, Variant, register_step
from compax.errors import UserError


@register_step
@dataclasses.dataclass(frozen=True)
class DynamicQuantize(MemberStep):
    """int8 per-channel weights, layer inputs quantized per tensor at run time."""

    name: ClassVar[str] = "dynamic_quantize"
    config_defaults: ClassVar[dict[str, str]] = {"reduce_range": "compress.reduce_range"}
    weight_bits: int = 8
    activation_bits: int = 8
    layers: str = "all"
    reduce_range: bool | None = None

    def __post_init__(self):
        if self.layers not in DYNAMIC_LAYERS:
            raise UserError(f"dynamic_quantize: layers must be one of {', '.join(DYNAMIC_LAYERS)},"
                            f" got {self.layers!r}")
        if self.activation_bits is None:
            raise UserError("dynamic_quantize quantizes activations: for float activations use"
                            " quantize(activation_bits=none)")
        self.quant_config()  # checks the bit widths

    def quant_config(self) -> QuantConfig:
        """The step's settings for `ptq`; an unset reduce_range: fbgemm's default, True."""
        return QuantConfig(
            weight_bits=self.weight_bits, activation_bits=self.activation_bits, dynamic=True,
            dynamic_layers=self.layers,
            reduce_range=QuantConfig().reduce_range if self.reduce_range is None else self.reduce_range)

    def shared(self, variant: Variant, ctx: Context) -> tuple:
        if variant.compressed.qstate is not None or variant.compressed.dtype != "float32":
            raise UserError("dynamic_quantize must act on a float32 model: put it before any"
                            " quantize or cast step in the recipe")
        images = ctx.calibration()  # one image, for the shapes of BatchNorm folding
        if isinstance(images, jax.ShapeDtypeStruct):
            return (jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype),)
        return (images[:1],)

    def member(self, model, compressed, example, *, ctx):
        variables, qstate = ptq(model, compressed.variables, example, self.quant_config())
        return Compressed(variables, qstate, weight_bits=self.weight_bits,
                          activation_bits=self.activation_bits)
