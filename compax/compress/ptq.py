"""Post-training static quantization as PyTorch eager mode does it with the fbgemm engine.

`torch.ao.quantization` with `get_default_qconfig('fbgemm')`: fuse conv+bn(+relu) and linear(+relu)
(BatchNorm folded, `fold.py`), observe activations on calibration images with the float model, then
quantize

- weights per output channel, symmetric: PerChannelMinMaxObserver, qint8 [-128, 127], scale
  max|w| / 127.5 (4-bit: [-8, 7], max|w| / 7.5); with `weight_granularity="per_tensor"` one scale
  per kernel instead, s = max|w| / ((2^b - 1) / 2) over the whole kernel (PyTorch's MinMaxObserver
  with qscheme=torch.per_tensor_symmetric), rounded and clipped the same way;
- activations per tensor, affine, at the input and after every fused group and add (placement in
  `interpret.py`): HistogramObserver (2048 bins, L2 search) or MinMaxObserver. With
  reduce_range=True (fbgemm's default, for its int16-accumulating AVX2 kernels) the scale and zero
  point are computed for [0, 127]; values are stored as quint8 and clipped to [0, 255], exactly as
  PyTorch's quantized tensors (so values up to about twice the calibrated range survive).
  Observers: `histogram` (one exact histogram over all calibration images), `histogram_batches`
  (PyTorch's HistogramObserver as a study runs it, fed `calibration_batch` = 128 images at a time,
  each batch's histogram merged into the running one by re-binning, `observers.histogram_merge`),
  `minmax`.

Dynamic quantization (`QuantConfig(dynamic=True)`, `torch.ao.quantization.quantize_dynamic` with
fbgemm, TFLite's dynamic-range quantization): the same weights, no calibration; at run time the
input of every conv / dense layer (`dynamic_layers="dense"`: dense layers only, as quantize_dynamic's
default nn.Linear) is quantized per tensor, from the min and max of the whole input of that call
(all images of the batch together), asymmetric on [0, 255] with the scale and zero point of
`observers.choose_qparams` for [0, 127] with reduce_range (PyTorch's dynamic Linear on fbgemm), the
layer computed on those values and its output left in float (no output quantization).

`ptq` returns fake-quantized weights (float values on the int grid, BatchNorm folded) and a
`QuantState`; `quantized_apply` runs the model with activations fake-quantized at every point.
Everything is a pure function of arrays: jit and vmap (over a population of models) work, and so
does `jax.grad` through the straight-through estimator. Models are called as
`model.apply(variables, x, train=False)`.
"""

import dataclasses
import functools
import numbers

import flax
import jax
import jax.numpy as jnp

from compax.compress import interpret
from compax.compress.fold import BatchNormFold, conv_bn_pairs, fold_batchnorm, skip_folded_batchnorm
from compax.compress.observers import (
    affine_qparams,
    choose_qparams,
    histogram,
    histogram_merge,
    histogram_range,
    histogram_start,
    minmax,
    per_channel_minmax,
    symmetric_qparams,
)
from compax.compress.paths import is_weight, path_str
from compax.compress.quant import fake_quant
from compax.errors import UserError

OBSERVERS = ("histogram", "minmax", "histogram_batches")
# How many weight scales a kernel has: one per output channel, or one for the whole kernel.
GRANULARITIES = ("per_channel", "per_tensor")
# Layers whose inputs dynamic quantization quantizes (`QuantConfig.dynamic_layers`).
DYNAMIC_LAYERS = {"all": interpret.LAYERS, "dense": frozenset({"dot_general"})}


def check_bits(key: str, bits) -> None:
    """Raises a UserError unless `bits` (the setting `key`) is an integer from 2 to 8: not a
    bool, not a float such as 3.5 or 4.0."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
        raise UserError(f"bad {key}={bits!r}: it takes a whole number of bits from 2 to 8,"
                        f" e.g. {key}=4")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Bit widths and observers; the defaults are PyTorch's fbgemm default qconfig at 8 bits.

    activation_bits=None keeps activations in float (weight-only quantization). dynamic=True
    quantizes the inputs of the `dynamic_layers` at run time from their own range (see the module
    doc) instead of calibrating activation points. `batch_size` only bounds memory (statistics are
    exact); `calibration_batch` is the batch the `histogram_batches` observer is fed.
    `weight_granularity`: one weight scale per output channel (fbgemm's default) or per kernel.
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    reduce_range: bool = True
    observer: str = "histogram"
    batch_size: int = 256
    dynamic: bool = False
    dynamic_layers: str = "all"
    calibration_batch: int = 128
    weight_granularity: str = "per_channel"

    def __post_init__(self):
        check_bits("weight_bits", self.weight_bits)
        if self.activation_bits is not None:
            check_bits("activation_bits", self.activation_bits)
        if self.observer not in OBSERVERS:
            raise UserError(f"unknown observer {self.observer!r}: choose one of {OBSERVERS}")
        if self.dynamic and self.activation_bits is None:
            raise UserError("dynamic quantization quantizes activations: give activation_bits")
        if self.dynamic_layers not in DYNAMIC_LAYERS:
            raise UserError(f"unknown dynamic_layers {self.dynamic_layers!r}: choose one of"
                            f" {', '.join(DYNAMIC_LAYERS)}")
        if self.calibration_batch < 1:
            raise UserError(f"calibration_batch must be >= 1, got {self.calibration_batch}")
        if self.weight_granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {self.weight_granularity!r}: choose one of"
                            f" {', '.join(GRANULARITIES)}")

    @property
    def weight_range(self) -> tuple[int, int]:
        """Signed integer range of the weights, e.g. (-128, 127)."""
        return -(2 ** (self.weight_bits - 1)), 2 ** (self.weight_bits - 1) - 1

    @property
    def activation_range(self) -> tuple[int, int]:
        """Unsigned range activations are stored in and clipped to, e.g. (0, 255)."""
        return 0, 2 ** self.activation_bits - 1

    @property
    def observer_range(self) -> tuple[int, int]:
        """Range the activation scale is computed for: (0, 127) with reduce_range at 8 bits."""
        return (0, 2 ** (self.activation_bits - 1) - 1) if self.reduce_range else self.activation_range


@flax.struct.dataclass
class QuantState:
    """Quantization parameters: activation points (in `interpret.py` order) and weight scales."""

    activation_scale: jax.Array  # (points,) float32
    activation_zero_point: jax.Array  # (points,) int32
    # params path of each kernel -> float32 scale, (out channels,) per channel or () per tensor;
    # zero points are 0.
    weight_scale: dict
    config: QuantConfig = flax.struct.field(pytree_node=False)
    folds: tuple[BatchNormFold, ...] = flax.struct.field(pytree_node=False)


def quantize_weights(params, config: QuantConfig, only=None):
    """(params with every conv/dense kernel fake-quantized symmetrically, {path: scale}):
    w_q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1) with s = max|w| / ((2^b - 1) / 2) per output
    channel, or over the whole kernel for `config.weight_granularity="per_tensor"` (a scalar s).
    `only`: the paths (e.g. "fc1/kernel") of the kernels to quantize, None for all."""
    qmin, qmax = config.weight_range
    per_tensor = config.weight_granularity == "per_tensor"
    scales = {}

    def quantize(path, w):
        if not is_weight(path, w) or (only is not None and path_str(path) not in only):
            return w
        ranges = minmax(w) if per_tensor else per_channel_minmax(w, -1)
        scale, zero_point = symmetric_qparams(*ranges, qmin, qmax)
        scales[path_str(path)] = scale
        return fake_quant(w, scale, zero_point, qmin, qmax, axis=None if per_tensor else w.ndim - 1)

    return jax.tree_util.tree_map_with_path(quantize, params), scales


class _LayerKernels(interpret.Backend):
    """Records the paths of the kernels that the layer primitives `names` use."""

    def __init__(self, names):
        self.names, self.paths = names, set()

    def layer(self, eqn, args, tags):
        if eqn.primitive.name in self.names:
            self.paths |= {t.path.removeprefix("params/") for t in tags if t.path}
        return super().layer(eqn, args, tags)


def layer_kernels(fn, variables, x, names) -> frozenset[str]:
    """Paths in params of the kernels used by the `names` layers (e.g. {"dot_general"}) of
    fn(variables, x), from an abstract trace."""
    backend = _LayerKernels(names)
    jax.eval_shape(lambda v, x: interpret.run(fn, backend, v, x)[0], variables, x)
    return frozenset(backend.paths)


def folded_apply(model, folds):
    """fn(variables, x) = model.apply(variables, x, train=False) with the folded BatchNorms skipped."""
    def fn(variables, x):
        with skip_folded_batchnorm(folds):
            return model.apply(variables, x, train=False)
    return fn


class _RangeObserver(interpret.Backend):
    """Records [min, max] at every quantization point."""

    def __init__(self):
        self.stats = []

    def quantize(self, x, point):
        self.stats.append(jnp.stack([jnp.min(x), jnp.max(x)]).astype(jnp.float32))
        return x


class _HistogramObserver(interpret.Backend):
    """Records the histogram of every quantization point over its [min, max]."""

    def __init__(self, ranges):
        self.ranges, self.stats = ranges, []

    def quantize(self, x, point):
        self.stats.append(histogram(x, self.ranges[point, 0], self.ranges[point, 1]))
        return x


class _BatchHistogramObserver(interpret.Backend):
    """HistogramObserver.forward at every quantization point on one batch: (histogram, min, max)
    started from the batch (`state` None) or merged into the running `state` of every point."""

    def __init__(self, state=None):
        self.state, self.stats = state, []

    def quantize(self, x, point):
        if self.state is None:
            self.stats.append(histogram_start(x))
        else:
            self.stats.append(histogram_merge(*(s[point] for s in self.state), x))
        return x


def _observe_batches(fn, variables, images, batch_size):
    """(histograms, min, max) per point of HistogramObservers fed `images` `batch_size` at a time in
    order, the last batch smaller (a PyTorch DataLoader without shuffling or drop_last)."""
    def step(state, x):
        backend = _BatchHistogramObserver(state)
        interpret.run(fn, backend, variables, x)
        return tuple(jnp.stack(s) for s in zip(*backend.stats, strict=True))

    full = images.shape[0] // batch_size * batch_size
    if full == 0:
        return step(None, images)
    batches = images[:full].reshape(-1, batch_size, *images.shape[1:])
    state, _ = jax.lax.scan(lambda s, x: (step(s, x), None), step(None, batches[0]), batches[1:])
    return state if full == images.shape[0] else step(state, images[full:])


def _observe(fn, variables, images, batch_size, make_backend, combine):
    """Statistics of `make_backend()` over `images` in batches, combined with `combine`."""
    def stats(x):
        backend = make_backend()
        interpret.run(fn, backend, variables, x)
        return jnp.stack(backend.stats)

    full = images.shape[0] // batch_size * batch_size
    if full == 0:
        return stats(images)
    batches = images[:full].reshape(-1, batch_size, *images.shape[1:])
    total, _ = jax.lax.scan(lambda acc, x: (combine(acc, stats(x)), None), stats(batches[0]),
                            batches[1:])
    return total if full == images.shape[0] else combine(total, stats(images[full:]))


def calibrate(model, variables, images, config: QuantConfig, folds=()):
    """(scale, zero point) per activation point, observed on `images` with the float model.

    `variables` are the float (BatchNorm-folded, for `folds`) weights, as PyTorch calibrates the
    prepared float model. HistogramObserver statistics are exact over all images: a first pass finds
    each point's [min, max], a second fills its 2048-bin histogram over that range (PyTorch merges
    per-batch histograms approximately; both agree when PyTorch sees the images in one batch).
    `histogram_batches` reproduces that merging, batch by batch (`config.calibration_batch`).
    """
    fn = folded_apply(model, folds)
    images = jnp.asarray(images, jnp.float32)
    search = jax.vmap(lambda h, a, b: histogram_range(h.astype(jnp.float32), a, b,
                                                      2 ** config.activation_bits))
    if config.observer == "histogram_batches":
        hists, lo, hi = _observe_batches(fn, variables, images, config.calibration_batch)
        return affine_qparams(*search(hists, lo, hi), *config.observer_range)

    def min_max(a, b):
        return jnp.stack([jnp.minimum(a[:, 0], b[:, 0]), jnp.maximum(a[:, 1], b[:, 1])], axis=1)

    ranges = _observe(fn, variables, images, config.batch_size, _RangeObserver, min_max)
    lo, hi = ranges[:, 0], ranges[:, 1]
    if config.observer == "histogram":
        hists = _observe(fn, variables, images, config.batch_size,
                         lambda: _HistogramObserver(ranges), jnp.add)
        lo, hi = search(hists, lo, hi)
    return affine_qparams(lo, hi, *config.observer_range)


@functools.partial(jax.jit, static_argnames=("model", "config"))
def ptq(model, variables, calib_images, config: QuantConfig = QuantConfig()):
    """(quantized variables, QuantState): fold BatchNorm, calibrate activations, quantize weights.

    Jitted (model and config are static); vmap it over a population of variables.
    """
    folds = conv_bn_pairs(model, variables, calib_images[:1])
    folded = fold_batchnorm(variables, folds)
    if config.activation_bits is None or config.dynamic:  # no calibrated activation points
        scale, zero_point = jnp.zeros(0, jnp.float32), jnp.zeros(0, jnp.int32)
    else:
        scale, zero_point = calibrate(model, folded, calib_images, config, folds)
    only = None
    if config.dynamic and config.dynamic_layers != "all":  # the other layers stay float
        only = layer_kernels(folded_apply(model, folds), folded, calib_images[:1],
                             DYNAMIC_LAYERS[config.dynamic_layers])
    params, weight_scale = quantize_weights(folded["params"], config, only)
    return {**folded, "params": params}, QuantState(scale, zero_point, weight_scale, config, folds)


class FakeQuant(interpret.Backend):
    """Fake-quantizes the activation at every point with the calibrated parameters; with dynamic
    quantization, the inputs of the dynamically quantized layers with their own range instead."""

    def __init__(self, qstate: QuantState):
        self.qstate = qstate

    def quantize(self, x, point):
        if self.qstate.config.dynamic:
            return x
        qmin, qmax = self.qstate.config.activation_range
        return fake_quant(x, self.qstate.activation_scale[point],
                          self.qstate.activation_zero_point[point], qmin, qmax)

    requantize = quantize

    def quantizes_input(self, eqn) -> bool:
        """Whether the layer `eqn` quantizes its activation inputs at run time (dynamic)."""
        config = self.qstate.config
        return config.dynamic and eqn.primitive.name in DYNAMIC_LAYERS[config.dynamic_layers]

    def input_qparams(self, x, point):
        """(scale, zero point) of the layer input `x` at point `point`: the point's calibrated
        ones, or with dynamic quantization those of x's own range (per tensor, no gradient)."""
        if self.qstate.config.dynamic:
            return choose_qparams(*minmax(jax.lax.stop_gradient(x)),
                                  *self.qstate.config.observer_range)
        return self.qstate.activation_scale[point], self.qstate.activation_zero_point[point]

    def layer(self, eqn, args, tags):
        if not self.quantizes_input(eqn):
            return super().layer(eqn, args, tags)
        qmin, qmax = self.qstate.config.activation_range
        args = [a if t.kind in (interpret.PARAM, interpret.CONST)
                else fake_quant(a, *self.input_qparams(a, t.point), qmin, qmax)
                for a, t in zip(args, tags, strict=True)]
        return interpret.bind(eqn, args)[0]


def run_quantized(model, variables_q, qstate: QuantState, x, backend: interpret.Backend):
    """The model on `x` with quantization points handled by `backend` (see `quantized_apply`)."""
    fn = folded_apply(model, qstate.folds)
    if qstate.config.activation_bits is None:
        return fn(variables_q, x)
    out, points = interpret.run(fn, backend, variables_q, x)
    if not qstate.config.dynamic and points != qstate.activation_scale.shape[0]:
        raise UserError(f"the model has {points} quantization points but the QuantState "
                        f"{qstate.activation_scale.shape[0]}: calibrate this model with `ptq`")
    return out


def quantized_apply(model, variables_q, qstate: QuantState, x):
    """Logits of the quantized model: weights as in `variables_q`, activations fake-quantized."""
    return run_quantized(model, variables_q, qstate, x, FakeQuant(qstate))
