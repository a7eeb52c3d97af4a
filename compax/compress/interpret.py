"""Run any JAX function with activation quantization placed where PyTorch eager-mode PTQ places it.

PyTorch's eager static quantization (fbgemm) quantizes the network input (QuantStub), the output of
every fused conv/linear [+ BatchNorm] [+ ReLU] group, and the output of every add / cat of
activations (FloatFunctional); max pooling, flattening and reshaping act on quantized tensors and
keep their scale, average pooling and means requantize with their input's scale. No model is
rewritten for that here: the function (e.g. `model.apply`) is traced to a jaxpr and the jaxpr is
evaluated primitive by primitive, each value carrying a tag that says where it stands:

    const, param   derived from literals / from the weights only (never quantized)
    pending        an activation whose quantization point is still open: the input, or the
                   output of a conv / dot_general or of a combination of activations; adding,
                   subtracting, multiplying or dividing by a parameter or constant (bias, an
                   unfolded BatchNorm) and a ReLU (max with a constant) keep it open, as the
                   fused module does
    grid(p)        on the grid of quantization point p (max pooling, reshape, transpose, slicing,
                   padding and clamps keep it there)
    offgrid(p)     averaged from grid(p) (sum / mean pooling, division by a constant): requantized
                   with point p's scale when used, as PyTorch's quantized avg_pool / mean
    float          anything else (e.g. tanh, softmax), left in float

An open value is closed (given a new quantization point, numbered in evaluation order) when any
other operation uses it, and the outputs are closed at the end, as the last layer's output observer
does before DeQuantStub; arrays that are not floating point (indices, masks) are never quantized. A
backend decides what closing means: record statistics (calibration), fake quantize, or run the
layers in integers, or write them as a graph (`compax/export/`), which also translates every other
equation (`Backend.primitive`). Calls of jitted / custom-derivative functions (jax.nn.relu is both)
are bound unchanged when nothing inside them needs the backend, so their custom gradients stay;
otherwise (or when the backend `enters` them) they are evaluated inside. Control-flow primitives
(cond, while, scan) run in float.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.extend import core

from compax.compress.paths import path_str

CONST, PARAM, PENDING, GRID, OFFGRID, FLOAT = "const", "param", "pending", "grid", "offgrid", "float"
_DATA = (PENDING, GRID, OFFGRID, FLOAT)

LAYERS = frozenset({"conv_general_dilated", "dot_general"})
# With one open activation and otherwise parameters or constants, these stay inside the fused group.
_FUSE = frozenset({"add", "sub", "mul", "div", "max"})
# On one activation (otherwise constants) these keep values on the activation's grid.
_SAME_GRID = frozenset({"reshape", "transpose", "squeeze", "broadcast_in_dim", "reduce_window_max",
                        "reduce_max", "reduce_min", "slice", "dynamic_slice", "gather", "rev",
                        "copy", "copy_p", "pad", "max", "min"})
# On one activation (otherwise constants) these average values of one grid.
_AVERAGE = frozenset({"reduce_window_sum", "reduce_sum", "div", "mul", "cumsum"})
# Primitives that call a jaxpr, and the parameter that holds it.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "remat": "jaxpr",
          "checkpoint": "jaxpr"}


@dataclasses.dataclass(frozen=True)
class Tag:
    """Where a value stands (see the module doc); `path` names a parameter leaf used as is."""

    kind: str
    point: int = -1
    path: str | None = None


class Backend:
    """What closing a quantization point and running a layer mean. The default is plain float."""

    def quantize(self, x, point: int):
        """Value of activation `x` at the new quantization point `point`."""
        return x

    def requantize(self, x, point: int):
        """Value of averaged activation `x` put back on the grid of `point`."""
        return x

    def layer(self, eqn, args, tags):
        """Output of a conv_general_dilated / dot_general equation on closed activations."""
        return bind(eqn, args)[0]

    def primitive(self, eqn, args, tags) -> list:
        """Outputs of any other equation (a call bound whole included); the default evaluates it."""
        return bind(eqn, args)

    def enters(self, eqn, tags) -> bool:
        """Whether a call that needs no quantization point is evaluated inside, equation by
        equation, instead of bound whole (the default, which keeps its custom gradient)."""
        return False


def bind(eqn, args):
    """Evaluate one jaxpr equation on `args`, as `jax.core.eval_jaxpr` does."""
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
    return out if eqn.primitive.multiple_results else [out]


def _to_close(name: str, tags: list[Tag]) -> list[int]:
    """Indices of the inputs that must be on a grid before primitive `name` runs."""
    data = [i for i, t in enumerate(tags) if t.kind in _DATA]
    if not data:
        return []
    if name in LAYERS or len(data) > 1:
        return [i for i in data if tags[i].kind != GRID]
    (i,) = data
    kind = tags[i].kind
    if kind == PENDING and name in _FUSE:
        return []
    if name in _SAME_GRID | _AVERAGE and _others_const(tags, i):
        return [i] if kind == PENDING else []
    return [i] if kind in (PENDING, OFFGRID) else []


def _out_tag(name: str, tags: list[Tag]) -> Tag:
    """Tag of the outputs of primitive `name` on inputs tagged `tags` (after closing)."""
    data = [i for i, t in enumerate(tags) if t.kind in _DATA]
    if not data:
        return Tag(PARAM) if any(t.kind == PARAM for t in tags) else Tag(CONST)
    if name in LAYERS or len(data) > 1:
        return Tag(PENDING)
    (i,) = data
    tag = tags[i]
    if tag.kind == PENDING:
        return tag
    if name in _SAME_GRID and _others_const(tags, i):
        return tag
    if name in _AVERAGE and _others_const(tags, i) and tag.kind in (GRID, OFFGRID):
        return Tag(OFFGRID, tag.point)
    return Tag(FLOAT)


def _others_const(tags, i) -> bool:
    return all(t.kind == CONST for j, t in enumerate(tags) if j != i)


def _is_layer(name: str, tags: list[Tag]) -> bool:
    return name in LAYERS and any(t.kind in _DATA for t in tags)


def _body(eqn):
    """(jaxpr, consts) called by a call-like equation, or None."""
    body = eqn.params.get(_CALLS.get(eqn.primitive.name, ""))
    if isinstance(body, core.ClosedJaxpr):
        return body.jaxpr, body.consts
    if isinstance(body, core.Jaxpr):
        return body, ()
    return None


def _read(env, v):
    if isinstance(v, core.Literal):
        return v.val, Tag(CONST)
    return env[v]


def _free_of_backend(jaxpr, consts, tags) -> list[Tag] | None:
    """Output tags of `jaxpr` if evaluating it needs no quantization point and no layer, else None."""
    env = {v: (None, Tag(CONST)) for v in jaxpr.constvars}
    env.update({v: (None, t) for v, t in zip(jaxpr.invars, tags, strict=True)})
    for eqn in jaxpr.eqns:
        in_tags = [_read(env, v)[1] for v in eqn.invars]
        name = eqn.primitive.name
        body = _body(eqn)
        if body is not None:
            out_tags = _free_of_backend(*body, in_tags)
            if out_tags is None:
                return None
        elif _to_close(name, in_tags) or _is_layer(name, in_tags):
            return None
        else:
            out_tags = [_out_tag(name, in_tags)] * len(eqn.outvars)
        env.update({v: (None, t) for v, t in zip(eqn.outvars, out_tags, strict=True)})
    return [_read(env, v)[1] for v in jaxpr.outvars]


class _Evaluation:
    """One tagged evaluation of a jaxpr: numbers the quantization points as they are closed."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.points = 0

    def close(self, x, tag: Tag):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x, tag  # indices, masks: never quantized
        if tag.kind in (PENDING, FLOAT):
            point, self.points = self.points, self.points + 1
            return self.backend.quantize(x, point), Tag(GRID, point)
        if tag.kind == OFFGRID:
            return self.backend.requantize(x, tag.point), Tag(GRID, tag.point)
        return x, tag

    def run(self, jaxpr, consts, args, tags):
        env = {v: (c, Tag(CONST)) for v, c in zip(jaxpr.constvars, consts, strict=True)}
        env.update(zip(jaxpr.invars, zip(args, tags, strict=True), strict=True))
        for eqn in jaxpr.eqns:
            vals, in_tags = map(list, zip(*[_read(env, v) for v in eqn.invars], strict=True)) \
                if eqn.invars else ([], [])
            name = eqn.primitive.name
            body = _body(eqn)
            # A custom_vjp call (max pooling) sees closed inputs, so that it can run whole, with
            # its gradient rule; other calls are entered with their inputs as they are.
            for i in _to_close(name, in_tags) if body is None or name == "custom_vjp_call" else []:
                vals[i], in_tags[i] = self.close(vals[i], in_tags[i])
                if not isinstance(eqn.invars[i], core.Literal):
                    env[eqn.invars[i]] = (vals[i], in_tags[i])
            if body is not None:
                out_tags = _free_of_backend(*body, in_tags)
                if out_tags is None or self.backend.enters(eqn, in_tags):
                    outs, out_tags = self.run(*body, vals, in_tags)
                else:
                    outs = self.backend.primitive(eqn, vals, in_tags)
            elif _is_layer(name, in_tags):
                outs, out_tags = [self.backend.layer(eqn, vals, in_tags)], [Tag(PENDING)]
            else:
                outs = self.backend.primitive(eqn, vals, in_tags)
                out_tags = [_out_tag(name, in_tags)] * len(outs)
            for v, x, t in zip(eqn.outvars, outs, out_tags, strict=True):
                if not isinstance(v, core.DropVar):
                    env[v] = (x, t)
        return map(list, zip(*[_read(env, v) for v in jaxpr.outvars], strict=True))


def run(fn, backend: Backend, params, x):
    """(fn(params, x) with its quantization points handled by `backend`, number of points).

    `params` (any pytree, e.g. flax variables) are weights: tagged `param`, each leaf with its path;
    `x` is the activation input (pending, so it gets the first point, as QuantStub). Traceable:
    works under jit, vmap and grad.
    """
    def shape_of(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype)

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(jax.tree.map(shape_of, params),
                                                               jax.tree.map(shape_of, x))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    x_leaves = jax.tree.leaves(x)
    args = [leaf for _, leaf in leaves] + x_leaves
    tags = [Tag(PARAM, path=path_str(p)) for p, _ in leaves] + [Tag(PENDING)] * len(x_leaves)
    evaluation = _Evaluation(backend)
    outs, out_tags = evaluation.run(closed.jaxpr, closed.consts, args, tags)
    outs = [evaluation.close(o, t)[0] if t.kind in (PENDING, OFFGRID) else o
            for o, t in zip(outs, out_tags, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs), evaluation.points
