"""Structured filter pruning with the filters physically removed: a smaller dense model.

Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017): in every prunable layer P with C
output channels (conv filters, dense units) the k = round(amount * C) channels of smallest L1 norm
s_c = sum |W_P[..., c]| are removed (the channels of `structured.layer_filter_masks`; equal norms:
lower channel first), and with them everything that only carries them. With K the kept channels of
P in increasing order and J the input indices of a consumer Q that carry a kept channel of P or no
prunable channel at all:

    W_P  (..., C_in, C)  ->  W_P[..., K]      b_P -> b_P[K]
    BatchNorm on P's output: scale, bias, mean, var -> [K]
    W_Q  (..., D, C_Q)   ->  W_Q[..., J, :]   (a conv's input channels, a dense layer's inputs)

A dense layer after a flatten reads each channel at H*W inputs; J follows the model's own flatten
order (NHWC: (h*W + w)*C + c; LeNet-5's channel-major: c*H*W + h*W + w), as it is derived, not
assumed. Every member of a population keeps the same number of channels in every layer, so the
shrunk members stack and vmap; the indices come from the norms (`jnp.nonzero` with a static size),
so `shrink` runs under `jit` and `vmap`.

What the shrunk model computes. A removed channel is gone, as in Li et al.: the shrunk model equals,
up to float rounding, the dense model in which for every removed channel c of P

    W_P[..., c] = 0,  b_P[c] = 0,  and every BatchNorm on P's output has scale[c] = bias[c] = 0,

so that the channel is 0 after P, its BatchNorm and ReLU / pooling / flattening (the tests compare
with exactly this). It is not the masked model of `layer_filter_masks` + `apply_masks`, which zeroes
kernels only: there a removed channel still outputs its bias, or its BatchNorm's shift
beta - gamma * mean / sqrt(var + eps), a constant that passes the ReLU into the next layer. No such
constant is folded into the consumers (behind a padded convolution it is not even constant: the
border sees the padding's zeros), so the shrunk model differs from the masked one by those
constants; they are the change Li et al.'s removal makes.

Which channels depend on which ("discovered, not declared", like `fold.conv_bn_pairs`):
`channel_graph` runs the model once, jit-compiled, with a `flax.linen.intercept_methods` interceptor
that replaces the output of every `nn.Conv` / `nn.Dense` by probe values, makes every BatchNorm the
identity, and records the inputs of every layer, BatchNorm and other module with parameters, and the
model's output. The batch holds four probes per layer P: P outputs 1 in every channel; c + 1 in
channel c; C - c in channel c; 0 while every other layer and the image output 1. An input index
carries channel c of P alone when it is nonzero in the first probe, zero in the fourth (nothing else
reaches it), and the second and third over the first give c + 1 and C - c at every spatial
position. P is prunable when every index its output reaches is of that kind, in conv / dense layers
and BatchNorms (axis -1) only, each channel reached equally often, and the model's output is not
reached. So a residual sum ties its summands (ResNet-18: the stem, every block's conv2 and shortcut
stay; each block's conv1 is pruned with bn1 and conv2's inputs), a concatenation is followed
(SqueezeNet: the expand layers feed the next squeeze at their offsets), a flatten is followed
(LeNet-5, VGG-6), and the classifier is never pruned. The ops between P and its consumers must act
on each channel alone and keep zeros (ReLU, max / average pooling, reshapes, transposes,
concatenation, dropout at evaluation); the probes reject the channel mixing, sums and offsets they
see, but cannot prove that property for every op, so a new model should be checked as the tests
check the four of compax.

Applying the shrunk model: the modules are unchanged and still declare the dense `features`;
inside `shrunk_layers()` every `nn.Conv` / `nn.Dense` takes its output features from the kernel in
its variables (flax's own call, with `features` set to the kernel's last dimension for the call),
and every layer's input size already follows its input. `shrunk_apply` applies a model so,
`Shrunk(model)` is a module that does it in its `__call__`. Multiply-adds are counted from the
traced program (`flops.count_macs`: every conv_general_dilated and dot_general), so the count is the
shrunk model's; Li et al. report these as "FLOP".
"""

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compax.compress.flops import count_macs
from compax.errors import UserError
from compax.models import INPUT_SHAPE

_OUTPUT = "<output>"
_PROBES = 4  # per layer: ones, c + 1, C - c, and 0 with everything else 1 (module doc)


def _shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _call_with_kernel_features(next_fun, args, kwargs, context):
    """An interceptor: nn.Conv / nn.Dense calls take `features` from their kernel's last axis."""
    module = context.module
    if context.method_name == "__call__" and type(module) in (nn.Conv, nn.Dense):
        kernel = module.variables.get("params", {}).get("kernel")
        if kernel is not None and kernel.shape[-1] != module.features:
            dense_features = module.features
            object.__setattr__(module, "features", kernel.shape[-1])  # modules are frozen dataclasses
            try:
                return next_fun(*args, **kwargs)
            finally:
                object.__setattr__(module, "features", dense_features)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def shrunk_layers():
    """Within the context, conv and dense layers take their output size from their kernels.

    Layers whose kernel has the declared size are untouched, so dense models apply as before.
    """
    with nn.intercept_methods(_call_with_kernel_features):
        yield


def shrunk_apply(model: nn.Module, variables, *args, **kwargs):
    """`model.apply(variables, *args, **kwargs)` for variables from `shrink` (or dense ones)."""
    with shrunk_layers():
        return model.apply(variables, *args, **kwargs)


class Shrunk(nn.Module):
    """`model` applied inside `shrunk_layers()`, with `model`'s own variable tree (shared scope)."""

    model: nn.Module

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, *args, **kwargs):
        with shrunk_layers():
            return self.model(*args, **kwargs)


def count_model_macs(model: nn.Module, variables, input_shape=INPUT_SHAPE) -> int:
    """Multiply-adds of conv and dense layers for one image of `input_shape` (H, W, C).

    Counted from the jaxpr of the model applied inside `shrunk_layers()` (`flops.count_macs`), so
    dense and shrunk variables alike give the work of the layers as shaped; `variables` may be
    arrays, tracers or shapes.
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return count_macs(lambda v, x: shrunk_apply(model, v, x, train=False), _shapes(variables), x)


@dataclasses.dataclass(frozen=True)
class ChannelMap:
    """The last axis of one recorded input: of the module at `module` (its '/'-joined path), of
    kind 'layer' (conv / dense) or 'norm' (BatchNorm); per index, the index in `ChannelGraph.layers`
    of the layer whose channel it carries (-1: none that may be pruned) and that channel."""

    module: str
    kind: str
    producer: tuple[int, ...]
    channel: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ChannelGraph:
    """The conv / dense layers in call order, their output channels, why a layer may not be
    pruned (None: it may), and the inputs of the layers and BatchNorms that carry channels."""

    layers: tuple[str, ...]
    channels: tuple[int, ...]
    reasons: tuple[str | None, ...]
    inputs: tuple[ChannelMap, ...]


def _module_kind(module) -> str | None:
    """'layer', 'norm', 'opaque' (another module with parameters of its own) or None."""
    own = [k for k, v in module.variables.get("params", {}).items() if not isinstance(v, dict)]
    if type(module) is nn.Dense or (type(module) is nn.Conv and module.feature_group_count == 1):
        return "layer"
    if isinstance(module, nn.BatchNorm) and module.axis in (-1,):
        return "norm"
    return "opaque" if own else None


def _discover(model, variables, x) -> list[tuple[str, str, int]]:
    """(path, kind, output channels) of every module call that matters, in call order (abstractly)."""
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and args:
            kind = _module_kind(context.module)
            if kind is not None:
                calls.append(("/".join(context.module.path), kind, out.shape[-1]))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    paths = [p for p, _, _ in calls]
    if len(set(paths)) != len(paths):
        twice = sorted({p for p in paths if paths.count(p) > 1})
        raise UserError(f"modules {twice} are called more than once: shrinking needs every layer "
                        "called once")
    return calls


def _probe_tables(channels: list[int]) -> list[np.ndarray]:
    """Per layer, its (4L, C) outputs over the probe batch (module doc)."""
    tables = []
    for q, c in enumerate(channels):
        rows = np.zeros((len(channels), _PROBES, c), np.float32)
        rows[:, 3] = 1.0
        rows[q] = [np.ones(c), np.arange(1, c + 1), c - np.arange(c), np.zeros(c)]
        tables.append(rows.reshape(-1, c))
    return tables


def _range_over_positions(a):
    """(min, max) over all axes but the first (batch) and the last (channels)."""
    a = a.reshape(a.shape[0], -1, a.shape[-1]).astype(jnp.float32)
    return a.min(axis=1), a.max(axis=1)


def _run_probes(model, variables, input_shape, calls) -> dict:
    """{module path or output: (min, max) over positions, (4L, D)} for the probe batch."""
    kinds = {p: k for p, k, _ in calls}
    layers = [(p, c) for p, k, c in calls if k == "layer"]
    size = _PROBES * len(layers)
    tables = dict(zip([p for p, _ in layers], _probe_tables([c for _, c in layers]), strict=True))

    def probe(v, x):
        records = {}

        def intercept(next_fun, args, kwargs, context):
            path = "/".join(context.module.path)
            if context.method_name != "__call__" or path not in kinds:
                return next_fun(*args, **kwargs)
            records[path] = _range_over_positions(args[0])
            if kinds[path] == "norm":
                return args[0]
            out = next_fun(*args, **kwargs)  # only its shape is used: XLA drops the computation
            if kinds[path] == "layer":
                table = tables[path].reshape(size, *[1] * (out.ndim - 2), -1)
                return jnp.broadcast_to(jnp.asarray(table, out.dtype), out.shape)
            return out

        with nn.intercept_methods(intercept):
            out = model.apply(v, x, train=False)
        for i, leaf in enumerate(jax.tree.leaves(out)):
            records[f"{_OUTPUT}{i}"] = _range_over_positions(leaf.reshape(size, -1, leaf.shape[-1]))
        return records

    x = np.zeros((len(layers), _PROBES, *input_shape), np.float32)
    x[:, 3] = 1.0
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    x = x.reshape(size, *input_shape)
    compiled = jax.jit(probe).lower(_shapes(zeros), _shapes(x)).compile()
    return jax.tree.map(np.asarray, compiled(zeros, x))  # runs now, also under an outer trace


def _classify(lo, hi, channels: int):
    """Per index of one record, for one layer's four probes (`lo`, `hi`: (4, D) minima and
    maxima over positions): whether the layer reaches it, and the channel it carries alone (-1:
    not alone, or not the same channel at every position)."""
    reached = (lo[0] != 0) | (hi[0] != 0)
    alone = reached & (lo[3] == 0) & (hi[3] == 0) & np.all(lo[:3] == hi[:3], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        up, down = hi[1] / hi[0], hi[2] / hi[0]
        whole = (np.abs(up - np.rint(up)) <= 1e-3 * np.abs(up)) & (
            np.abs(down - np.rint(down)) <= 1e-3 * np.abs(down))
    c_up, c_down = np.rint(np.nan_to_num(up)) - 1, channels - np.rint(np.nan_to_num(down))
    alone &= whole & (c_up == c_down) & (c_up >= 0) & (c_up < channels)
    return reached, np.where(alone, c_up, -1).astype(np.int64)


def _derive(model, variables, input_shape) -> ChannelGraph:
    calls = _discover(model, variables, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    kinds = {p: k for p, k, _ in calls}
    layers = [p for p, k, _ in calls if k == "layer"]
    channels = [c for _, k, c in calls if k == "layer"]
    records = _run_probes(model, variables, input_shape, calls)
    reasons: list[str | None] = [None] * len(layers)
    maps = {}  # module -> (producer, channel) per index of its input
    for module, (lo, hi) in records.items():
        size = lo.shape[-1]
        lo, hi = lo.reshape(len(layers), _PROBES, size), hi.reshape(len(layers), _PROBES, size)
        output, opaque = module.startswith(_OUTPUT), kinds.get(module) == "opaque"
        producer, channel = np.full(size, -1), np.full(size, -1)
        for p, c in enumerate(channels):
            if layers[p] == module:
                continue
            reached, ch = _classify(lo[p], hi[p], c)
            if not reached.any():
                continue
            if output:
                reasons[p] = reasons[p] or "its channels reach the model's output"
            elif opaque:
                reasons[p] = reasons[p] or f"its channels reach {module}, not a conv, dense or BatchNorm"
            elif np.any(ch[reached] < 0):
                reasons[p] = reasons[p] or (f"its channels are summed with others or mixed before "
                                            f"{module}")
            else:
                producer[reached], channel[reached] = p, ch[reached]
        if not (output or opaque):
            maps[module] = (producer, channel)
    changed = True
    while changed:  # each channel of a prunable layer reaches an input equally often (static sizes)
        changed = False
        for module, (producer, channel) in maps.items():
            for p in set(producer[producer >= 0].tolist()):
                counts = np.bincount(channel[producer == p], minlength=channels[p])
                if reasons[p] is None and counts.min() != counts.max():
                    reasons[p], changed = f"its channels reach {module} unequally often", True
    inputs = []
    for module, (producer, channel) in maps.items():
        free = np.array([p < 0 or reasons[p] is not None for p in producer.tolist()], bool)
        inputs.append(ChannelMap(module, kinds[module], tuple(np.where(free, -1, producer).tolist()),
                                 tuple(np.where(free, -1, channel).tolist())))
    return ChannelGraph(tuple(layers), tuple(channels), tuple(reasons), tuple(inputs))
