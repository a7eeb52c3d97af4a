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
model's output (the other modules' outputs count as any other layer's that is not P). The batch
holds four probes per layer P (P outputs 1 in every channel; c + 1 in channel c; C - c in channel c;
0 while every other layer and the image output 1) and one probe in which everything is 0. P reaches
an input index where its first probe differs from the all-zero one; the index carries channel c of P
alone when it is 0 in the all-zero probe (no constant is added on the way) and in P's fourth
(nothing else reaches it), and P's second and third over its first give c + 1 and C - c at every
spatial position. P is prunable when every index it reaches is of that kind, in conv / dense layers
and BatchNorms (axis -1) only, each of its channels reached equally often, and the model's output is
not reached. So a residual sum ties its summands (ResNet-18: the stem, every block's conv2 and
shortcut stay whole; each block's conv1 is pruned with bn1 and conv2's inputs), a concatenation is
followed (SqueezeNet: the expand layers feed the next squeeze at their offsets), a flatten is
followed (LeNet-5, VGG-6), and the classifier is never pruned. The ops between P and its consumers
must act on each channel alone and keep zeros (ReLU, max / average pooling, reshapes, transposes,
concatenation, dropout at evaluation); the probes reject the channel mixing, sums and offsets they
see, but cannot prove that property for every op, so check a new model as the tests check the four
of compax.

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
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from compax.compress.flops import count_macs
from compax.compress.paths import compile_exclude
from compax.compress.prune import num_to_prune
from compax.errors import UserError
from compax.models import INPUT_SHAPE, count_params

_OUTPUT = "<output>"
_PROBES = 4  # per layer: ones, c + 1, C - c, and 0 with everything else 1; then one all 0 (module doc)


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
    """Per layer, its (4L + 1, C) outputs over the probe batch (module doc)."""
    tables = []
    for q, c in enumerate(channels):
        rows = np.zeros((len(channels), _PROBES, c), np.float32)
        rows[:, 3] = 1.0
        rows[q] = [np.ones(c), np.arange(1, c + 1), c - np.arange(c), np.zeros(c)]
        tables.append(np.concatenate([rows.reshape(-1, c), np.zeros((1, c), np.float32)]))
    return tables


def _range_over_positions(a):
    """(min, max) over all axes but the first (batch) and the last (channels)."""
    a = a.reshape(a.shape[0], -1, a.shape[-1]).astype(jnp.float32)
    return a.min(axis=1), a.max(axis=1)


def _run_probes(model, variables, input_shape, calls) -> dict:
    """{module path or output: (min, max) over positions, (4L + 1, D)} for the probe batch."""
    kinds = {p: k for p, k, _ in calls}
    layers = [(p, c) for p, k, c in calls if k == "layer"]
    size = _PROBES * len(layers) + 1
    tables = dict(zip([p for p, _ in layers], _probe_tables([c for _, c in layers]), strict=True))
    tables[""] = np.zeros(size, np.float32)  # other modules with parameters: 1 in every fourth probe
    tables[""][3:-1:_PROBES] = 1.0

    def probe(v, x, tables):  # the tables are arguments: as constants XLA would fold the whole net
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
                return jnp.broadcast_to(table.astype(out.dtype), out.shape)
            return jax.tree.map(  # an opaque module's output is another source, as other layers'
                lambda o: jnp.broadcast_to(tables[""].reshape(-1, *[1] * (o.ndim - 1)), o.shape), out)

        with nn.intercept_methods(intercept):
            out = model.apply(v, x, train=False)
        for i, leaf in enumerate(jax.tree.leaves(out)):
            records[f"{_OUTPUT}{i}"] = _range_over_positions(leaf.reshape(size, -1, leaf.shape[-1]))
        return records

    x = np.zeros((len(layers), _PROBES, *input_shape), np.float32)
    x[:, 3] = 1.0
    x = np.concatenate([x.reshape(-1, *input_shape), np.zeros((1, *input_shape), np.float32)])
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    compiled = jax.jit(probe).lower(*_shapes((zeros, x, tables))).compile()
    return jax.tree.map(np.asarray, compiled(zeros, x, tables))  # runs now, even under a trace


def _classify(lo, hi, base, channels: int):
    """For one record and one layer's four probes (`lo`, `hi`: (4, D) minima and maxima over
    positions; `base`: (2, D), those of the all-zero probe), per index: whether the layer reaches
    it, whether it is nonzero with everything zero (an offset), and the channel it carries alone
    (-1: not alone, or not the same channel at every position)."""
    reached = (lo[0] != base[0]) | (hi[0] != base[1])
    offset = (base[0] != 0) | (base[1] != 0)
    alone = reached & ~offset & (lo[3] == 0) & (hi[3] == 0) & np.all(lo[:3] == hi[:3], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        up, down = hi[1] / hi[0], hi[2] / hi[0]
        whole = (np.abs(up - np.rint(up)) <= 1e-3 * np.abs(up)) & (
            np.abs(down - np.rint(down)) <= 1e-3 * np.abs(down))
    c_up, c_down = np.rint(np.nan_to_num(up)) - 1, channels - np.rint(np.nan_to_num(down))
    alone &= whole & (c_up == c_down) & (c_up >= 0) & (c_up < channels)
    return reached, offset, np.where(alone, c_up, -1).astype(np.int64)


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
        base = np.stack([lo[-1], hi[-1]])
        lo, hi = lo[:-1].reshape(len(layers), _PROBES, size), hi[:-1].reshape(len(layers), _PROBES, size)
        output, opaque = module.startswith(_OUTPUT), kinds.get(module) == "opaque"
        producer, channel = np.full(size, -1), np.full(size, -1)
        for p, c in enumerate(channels):
            if layers[p] == module:
                continue
            reached, offset, ch = _classify(lo[p], hi[p], base, c)
            if not reached.any():
                continue
            if output:
                reason = "its channels reach the model's output"
            elif opaque:
                reason = f"its channels reach {module}, not a conv, dense or BatchNorm"
            elif np.any(offset[reached]):
                reason = f"a constant is added to its channels before {module} (zero is not kept)"
            elif np.any(ch[reached] < 0):
                reason = f"its channels are summed with others or mixed before {module}"
            else:
                reason = None
                producer[reached], channel[reached] = p, ch[reached]
            reasons[p] = reasons[p] or reason
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


_GRAPHS: dict = {}


def channel_graph(model: nn.Module, variables, input_shape=INPUT_SHAPE) -> ChannelGraph:
    """Which channels every conv / dense layer's and BatchNorm's input carries (module doc).

    Depends only on the model and the shapes of `variables` (arrays, tracers or shapes), and is
    cached for them; one jit-compiled probe run (about a second for ResNet-18 on a CPU).
    """
    shapes = _shapes(variables)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    key = (model, treedef, tuple((s.shape, str(s.dtype)) for s in leaves), tuple(input_shape))
    try:
        hash(key)
    except TypeError:  # a module with unhashable attributes: not cached
        return _derive(model, shapes, tuple(input_shape))
    if key not in _GRAPHS:
        _GRAPHS[key] = _derive(model, shapes, tuple(input_shape))
    return _GRAPHS[key]


@dataclasses.dataclass(frozen=True)
class ShrinkInfo:
    """What `shrink` did, static (a pytree without leaves, so `shrink` may be jitted or vmapped
    whole): per conv / dense layer in call order (path, channels before, after); the layers left
    whole and why; parameters and multiply-adds for one image before and after."""

    amount: float
    channels: tuple[tuple[str, int, int], ...]
    not_pruned: tuple[tuple[str, str], ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    def as_dict(self) -> dict:
        """JSON-ready: the fields, the kept channels by layer and the remaining fractions."""
        return {
            "amount": self.amount if isinstance(self.amount, int) else float(self.amount),
            "channels": {path: {"before": before, "after": after}
                         for path, before, after in self.channels},
            "not_pruned": dict(self.not_pruned),
            "params_before": self.params_before, "params_after": self.params_after,
            "params_fraction": self.params_after / self.params_before,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "macs_fraction": self.macs_after / self.macs_before,
        }


jax.tree_util.register_pytree_node(ShrinkInfo, lambda info: ((), info), lambda info, _: info)


def _pruned_counts(graph: ChannelGraph, amount, exclude: str | None) -> dict[int, int]:
    """{layer index: filters removed} of the layers `shrink` prunes."""
    if isinstance(amount, jax.Array) or not isinstance(amount, int | float | np.number):
        raise UserError(f"shrink needs a Python number as amount (the sizes are static), got {amount!r}")
    pattern = compile_exclude(exclude)
    counts = {}
    for i, (path, channels, reason) in enumerate(zip(graph.layers, graph.channels, graph.reasons,
                                                     strict=True)):
        if reason is None and not (pattern and pattern.search(f"{path}/kernel")):
            k = num_to_prune(amount, channels)
            if k >= channels:
                raise UserError(f"amount {amount} removes all {channels} filters of {path}: "
                                "pass a smaller amount or exclude the layer")
            counts[i] = k
    return counts


def _take_leaves(flat: dict, module: str, index, size: int, axis: int, only: str | None = None):
    """Gathers `index` along `axis` of the leaves of `module` (in every collection of `flat`)
    whose size there is `size`; `only` restricts to one leaf name."""
    for leaves in flat.values():
        for key, leaf in leaves.items():
            owner, _, name = key.rpartition("/")
            if (owner == module and (only is None or name == only) and leaf.ndim >= -axis
                    and leaf.shape[axis] == size):
                leaves[key] = jnp.take(leaf, index, axis=axis)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _remove_filters(variables, graph: ChannelGraph, removed: tuple[tuple[int, int], ...]):
    """`variables` without the `removed` (layer index, count) lowest-L1 filters (module doc)."""
    removed = dict(removed)
    flat = {name: dict(traverse_util.flatten_dict(tree, sep="/")) for name, tree in variables.items()}
    kept_flags = []  # per layer, its kept output channels (all of a layer left whole)
    for i, (path, channels) in enumerate(zip(graph.layers, graph.channels, strict=True)):
        flags = jnp.ones(channels, bool)
        if i in removed:  # the lowest L1 norms, equal norms lower channel first (as layer_filter_masks)
            kernel = flat["params"][f"{path}/kernel"].astype(jnp.float32)
            norms = jnp.sum(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
            flags = flags.at[jnp.argsort(norms, stable=True)[:removed[i]]].set(False)
        kept_flags.append(flags)
    offsets = np.cumsum([0, *graph.channels])
    flags = jnp.concatenate(kept_flags)
    for entry in graph.inputs:  # the consumers' inputs and the BatchNorms' channels
        producer, channel = np.asarray(entry.producer), np.asarray(entry.channel)
        cut = np.isin(producer, list(removed))
        if not cut.any():
            continue
        size = len(producer) - sum(removed[p] * int(np.sum(producer == p)) // graph.channels[p]
                                   for p in set(producer[cut].tolist()))
        keep = jnp.where(cut, flags[offsets[np.maximum(producer, 0)] + np.maximum(channel, 0)], True)
        index = jnp.nonzero(keep, size=size)[0]
        if entry.kind == "layer":
            _take_leaves(flat, entry.module, index, len(producer), -2, only="kernel")
        else:
            _take_leaves(flat, entry.module, index, len(producer), -1)
    for i, k in removed.items():  # the layers' own filters
        index = jnp.nonzero(kept_flags[i], size=graph.channels[i] - k)[0]
        _take_leaves(flat, graph.layers[i], index, graph.channels[i], -1)
    return {name: traverse_util.unflatten_dict(leaves, sep="/") for name, leaves in flat.items()}


def shrink(model: nn.Module, variables, amount, *, exclude: str | None = None,
           input_shape=INPUT_SHAPE):
    """(small_variables, ShrinkInfo): `variables` with the filters of smallest L1 norm removed.

    In every prunable conv / dense layer (see `channel_graph`; those matching the regular
    expression `exclude` in their kernel path, e.g. '^conv1/', stay whole) round(amount * C)
    filters are removed (`amount` a Python fraction, or an integer count per layer), with their
    biases, BatchNorm entries and the consumers' inputs (module doc; Li et al. 2017). Apply the
    result with `shrunk_apply` or `Shrunk(model)`; it equals the dense model with those filters'
    kernels, biases and BatchNorm scales and shifts zeroed. Pure in `variables`: jit with `model`,
    `amount`, `exclude` static, vmap over a population (every member keeps as many channels).
    """
    graph = channel_graph(model, variables, input_shape)
    removed = _pruned_counts(graph, amount, exclude)
    small = _remove_filters(variables, graph, tuple(removed.items()))
    after = dict(zip([graph.layers[i] for i in removed], [graph.channels[i] - k for i, k in removed.items()],
                     strict=True))
    info = ShrinkInfo(
        amount=amount,
        channels=tuple((p, c, after.get(p, c)) for p, c in zip(graph.layers, graph.channels, strict=True)),
        not_pruned=tuple((p, r or "excluded") for i, (p, r) in enumerate(zip(graph.layers, graph.reasons,
                                                                                 strict=True))
                         if i not in removed),
        params_before=count_params(variables["params"]), params_after=count_params(small["params"]),
        macs_before=count_model_macs(model, variables, input_shape),
        macs_after=count_model_macs(model, small, input_shape))
    return small, info
