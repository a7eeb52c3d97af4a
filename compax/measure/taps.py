"""Intermediate activations of any compressed variant, read without rewriting the model.

Grad-CAM (Selvaraju et al. 2017) needs the feature map A of the last convolutional stage and dy/dA;
t-SNE of embeddings (Zee et al.) needs the penultimate representation. Both are taken from the
model's top-level module calls with a `flax.linen.intercept_methods` interceptor:

    classifier   the last top-level module called (lenet5, vgg6: fc3; resnet18: fc;
                 squeezenet: classifier, its 1x1 convolution)
    last_conv    the last top-level module with parameters whose output is a feature map
                 (rank 4), called before the classifier (lenet5: conv2; vgg6: bn6; resnet18:
                 layer4_1; squeezenet: fire8)

Modules are found from an abstract trace of the model, not from a table of names, so ablated
models (`drop_last_block`) tap their new last stage. The taps are

    last_conv    the output of that module as the variant computes it (lenet5 and vgg6: before
                 the ReLU that follows; resnet18 and squeezenet: the block's rectified output)
    features     the classifier's input, averaged over space where it is a feature map
                 (squeezenet), shape (N, D)

and `offsets` (zeros of last_conv's shape) are added to the module output before the model uses
it, so that jax.grad with respect to `offsets` is dy/d(last_conv).

Quantized variants run through the same jaxpr interpreter as `apply_compressed`
(`compax.compress.interpret`), with the offsets as parameters (fused into the layer's output, no new
quantization point), so logits are exactly `apply_compressed`'s. There the classifier's input is
its value on the 8-bit grid (what the classifier consumes) and last_conv is the layer's float output
before it is rounded to its grid; the taps, left open at the end of the evaluation, get quantization
points after the model's own ones, which this module's backend leaves unquantized.

`map_batches` runs these per-sample analyses (taps, saliency, Grad-CAM) a fixed batch at a time;
`cpu_convolutions_for` and `apply_with_cpu_convolutions` put the CPU convolution kernels
(`compax.kernels`) into the variants that can take them.
"""

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from compax.compress import Compressed, apply_compressed, interpret
from compax.compress.ptq import FakeQuant, folded_apply
from compax.errors import UserError
from compax.kernels import cpu_convolutions


@dataclasses.dataclass(frozen=True)
class TapPoints:
    """Names of the tapped top-level modules, and the shape of last_conv's output."""

    last_conv: str
    classifier: str
    last_conv_shape: tuple[int, ...]


def _top_level_name(context) -> str | None:
    """Name of a top-level module's `__call__`, else None."""
    path = context.module.path
    return path[0] if context.method_name == "__call__" and len(path) == 1 else None


def _compute_dtype(compressed: Compressed):
    """Dtype the variant computes in: that of its parameters (float16 / bfloat16 variants)."""
    return jnp.result_type(*jax.tree.leaves(compressed.variables["params"]))


def tap_points(model: nn.Module, compressed: Compressed, x) -> TapPoints:
    """The modules `apply_with_taps` taps in `model` on images shaped like `x` (see the module doc).

    Traces the model abstractly (no computation): `x` and the variables may be arrays or tracers.
    """
    calls = []  # (name, has parameters, output shape)

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = _top_level_name(context)
        if name is not None:
            calls.append((name, bool(context.module.variables.get("params")), out.shape))
        return out

    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), compressed.variables)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes,
                       jax.ShapeDtypeStruct(x.shape, _compute_dtype(compressed)))
    if not calls:
        raise UserError(f"{type(model).__name__} calls no submodule: taps need a model built from "
                        "named flax modules (conv layers and a classifier)")
    classifier = calls[-1][0]
    maps = [(name, shape) for name, has_params, shape in calls[:-1] if has_params and len(shape) == 4]
    if not maps:
        raise UserError(f"{type(model).__name__} has no convolutional module before its classifier "
                        f"{classifier!r}: Grad-CAM and taps need one")
    last_conv, shape = maps[-1]
    names = [name for name, _, _ in calls]
    for name in (last_conv, classifier):
        if names.count(name) > 1:
            raise UserError(f"module {name!r} is called {names.count(name)} times: taps need the "
                            "last conv stage and the classifier to be called once")
    return TapPoints(last_conv, classifier, tuple(shape))


def cpu_convolutions_for(compressed: Compressed):
    """`compax.kernels.cpu_convolutions()` for a variant that runs as a plain `model.apply` (float,
    pruned, float16 / bfloat16, weight-only int8: the kernels take the float32 layers they fit), a
    context that changes nothing for an activation-quantized one, whose jaxpr interpreter
    (`compax.compress.interpret`) must see XLA's convolutions to place its quantization points.
    Enter it inside the function that is traced (jitted, differentiated, vmapped)."""
    qstate = compressed.qstate
    if qstate is None or qstate.config.activation_bits is None:
        return cpu_convolutions()
    return contextlib.nullcontext()


def apply_with_cpu_convolutions(model: nn.Module, compressed: Compressed, x):
    """`apply_compressed(model, compressed, x)` with the CPU convolution kernels where the variant
    takes them (`cpu_convolutions_for`): the same logits up to float rounding."""
    with cpu_convolutions_for(compressed):
        return apply_compressed(model, compressed, x)


class _ModelPointsOnly(FakeQuant):
    """FakeQuant for the model's own quantization points; points after them (taps) stay float."""

    def quantize(self, x, point):
        if point >= self.qstate.activation_scale.shape[0]:
            return x
        return super().quantize(x, point)

    requantize = quantize


def apply_with_taps(model: nn.Module, compressed: Compressed, x, offsets=None):
    """(logits, {"last_conv": A, "features": f}) of the variant on normalised images `x` (N, H, W, C).

    logits (N, classes) are `apply_compressed(model, compressed, x)`; A is the tapped module's output
    plus `offsets` (float32, A's shape; zeros when None), so that d logits / d offsets = d logits /
    dA; f (N, D) is the classifier's input (see the module doc). All float32. jit-, vmap- and
    grad-compatible.
    """
    points = tap_points(model, compressed, x)
    dtype = _compute_dtype(compressed)
    if offsets is None:
        offsets = jnp.zeros(points.last_conv_shape, jnp.float32)
    if offsets.shape != points.last_conv_shape:
        raise UserError(f"offsets {offsets.shape} do not match the {points.last_conv} output "
                        f"{points.last_conv_shape}: pass zeros of that shape")
    qstate = compressed.qstate
    forward = folded_apply(model, qstate.folds) if qstate is not None else (
        lambda variables, x: model.apply(variables, x, train=False))

    def tapped(params, x):
        taps = {}

        def intercept(next_fun, args, kwargs, context):
            name = _top_level_name(context)
            if name == points.classifier:
                taps["features"] = args[0]
            out = next_fun(*args, **kwargs)
            if name != points.last_conv:
                return out
            taps["last_conv"] = out
            return out + params["offsets"].astype(out.dtype)

        with nn.intercept_methods(intercept):
            logits = forward(params["variables"], x)
        return logits, taps

    params = {"variables": compressed.variables, "offsets": offsets}
    x = x.astype(dtype)
    if qstate is None or qstate.config.activation_bits is None:
        logits, taps = tapped(params, x)
    else:
        (logits, taps), count = interpret.run(tapped, _ModelPointsOnly(qstate), params, x)
        if count < qstate.activation_scale.shape[0]:
            raise UserError(f"the model has fewer quantization points ({count}) than the QuantState "
                            f"({qstate.activation_scale.shape[0]}): calibrate this model with `ptq`")
    features = taps["features"]
    if features.ndim == 4:
        features = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
    return logits.astype(jnp.float32), {"last_conv": taps["last_conv"].astype(jnp.float32),
                                        "features": features.astype(jnp.float32)}


def images_and_targets(x, targets):
    """(float32 images, int32 targets) after checking that they are (N, H, W, C) and (N,)."""
    x = jnp.asarray(x, jnp.float32)
    targets = jnp.asarray(targets, jnp.int32)
    if x.ndim != 4 or targets.shape != x.shape[:1]:
        raise UserError(f"images {x.shape} and targets {targets.shape} do not match: pass images "
                        "(N, H, W, C) and integer targets (N,)")
    return x, targets


def map_batches(fn, batch_size: int, *arrays):
    """fn(*arrays) computed `batch_size` samples at a time with `jax.lax.map` (memory bounded).

    `fn` maps arrays with a leading sample axis to a pytree of arrays with the same leading axis;
    the last batch is padded with zeros and the padding dropped, so `fn` must treat samples
    independently (models in evaluation mode do). jit- and vmap-compatible.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}: pass a positive batch size")
    num = arrays[0].shape[0]
    if num == 0:
        raise UserError("no samples to evaluate: pass at least one image")
    batch = min(batch_size, num)
    pad = (-num) % batch
    batches = [jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(-1, batch, *a.shape[1:])
               for a in arrays]
    out = jax.lax.map(lambda args: fn(*args), batches)
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:num], out)
