"""Post-training quantization as a recipe step: `quantize(weight_bits, activation_bits, observer,
reduce_range, granularity)`.

Static PTQ as PyTorch eager mode with the fbgemm engine (Schwaiger et al. 2022; Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"):
BatchNorm folded, weights per output channel symmetric, w_q = clip(round(w / s_w), -2^(b-1),
2^(b-1) - 1) with s_w = max|w| / ((2^b - 1) / 2); activations per tensor affine with observers
calibrated on training images (`compax.compress.ptq`). `activation_bits=none` quantizes the weights
only and keeps activations in float. `observer` (`histogram`, `histogram_batches`: PyTorch's
HistogramObserver fed batches of 128 images, `minmax`; see `compax.compress.ptq`) and
`reduce_range` default to the config's `compress.observer` and `compress.reduce_range`, filled in
when the recipe is parsed with the run's config (`registry.Step.config_defaults`); parsed without
one, they fall back to fbgemm's defaults, `histogram` and reduce_range=True. `granularity=per_tensor`
quantizes each kernel with one symmetric scale, s_w = max|w| / ((2^b - 1) / 2) over the kernel,
instead of one per output channel (`per_channel`, the default); `Compressed.granularity` records it.
"""

import dataclasses
from typing import ClassVar

import jax

from compax.compress.compressed import Compressed
from compax.compress.fold import fold_batchnorm
from compax.compress.ptq import OBSERVERS, QuantConfig, ptq
from compax.compress.registry import Context, MemberStep, Variant, register_step
from compax.errors import UserError


@register_step
@dataclasses.dataclass(frozen=True)
class Quantize(MemberStep):
    """fbgemm-style PTQ of every member on the run's calibration images."""

    name: ClassVar[str] = "quantize"
    config_defaults: ClassVar[dict[str, str]] = {"observer": "compress.observer",
                                                 "reduce_range": "compress.reduce_range"}
    weight_bits: int = 8
    activation_bits: int | None = 8
    observer: str | None = None
    reduce_range: bool | None = None
    granularity: str = "per_channel"

    def __post_init__(self):
        if self.observer is not None and self.observer not in OBSERVERS:
            raise UserError(f"quantize: unknown observer {self.observer!r}: choose one of"
                            f" {', '.join(OBSERVERS)}")
        self.quant_config()  # checks the bit widths and the granularity

    def quant_config(self) -> QuantConfig:
        """The step's settings for `ptq`; an unset observer or reduce_range: fbgemm's defaults."""
        unset = QuantConfig()
        return QuantConfig(
            weight_bits=self.weight_bits, activation_bits=self.activation_bits,
            observer=unset.observer if self.observer is None else self.observer,
            reduce_range=unset.reduce_range if self.reduce_range is None else self.reduce_range,
            weight_granularity=self.granularity)

    def shared(self, variant: Variant, ctx: Context) -> tuple:
        if variant.compressed.qstate is not None or variant.compressed.dtype != "float32":
            raise UserError("quantize must act on a float32 model: put it before any other"
                            " quantize or cast step in the recipe")
        return (ctx.calibration(),)

    def __call__(self, variant: Variant, ctx: Context) -> Variant:
        made = super().__call__(variant, ctx)
        # The folded float weights before rounding, from which `qat` trains.
        folds = made.compressed.qstate.folds
        fold = jax.vmap(lambda v: fold_batchnorm(v, folds))
        made.float_variables = (jax.eval_shape(fold, variant.compressed.variables) if ctx.abstract
                                else fold(variant.compressed.variables))
        return made

    def member(self, model, compressed, calib, *, ctx):
        variables, qstate = ptq(model, compressed.variables, calib, self.quant_config())
        return Compressed(variables, qstate, weight_bits=self.weight_bits,
                          activation_bits=self.activation_bits or 32, granularity=self.granularity)
