"""Folding BatchNorm into the conv or dense layer whose output it normalises.

With running statistics a BatchNorm is affine, so it merges into the preceding layer
(`torch.nn.utils.fusion.fuse_conv_bn_weights`, which eager-mode PTQ applies when fusing conv+bn):

    r  = rsqrt(var + eps)
    W' = W * (gamma * r)             (per output channel, the kernel's last axis)
    b' = (b - mean) * r * gamma + beta

Which BatchNorm follows which layer is discovered, not declared: `conv_bn_pairs` runs the model
abstractly (`jax.eval_shape`) with a `flax.linen.intercept_methods` interceptor that records every
module call, and pairs a BatchNorm with the conv / dense layer whose output array is its input. The
folded variables keep b' in the BatchNorm's `bias` and zero the layer's own bias; inside
`skip_folded_batchnorm` every folded BatchNorm call returns `x + bias`, so the model computes
conv(x, W') + b' without being rewritten.
"""

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from compax.errors import UserError


@dataclasses.dataclass(frozen=True)
class BatchNormFold:
    """A BatchNorm (`bn`, its params path) folded into the layer at params path `layer`."""

    layer: str
    bn: str
    epsilon: float


def _shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def conv_bn_pairs(model: nn.Module, variables, x) -> tuple[BatchNormFold, ...]:
    """The BatchNorms of `model` that directly consume a conv or dense layer's output.

    Traces `model.apply(variables, x, train=False)` abstractly (no computation), so `variables`
    and `x` may be arrays, tracers or shapes.
    """
    layers, norms = [], []  # (path, output) of conv/dense calls; (module, path, input) of BNs

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and args:
            path = "/".join(module.path)
            if isinstance(module, nn.BatchNorm):
                norms.append((module, path, args[0]))
            elif "kernel" in module.variables.get("params", {}):
                layers.append((path, out))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), _shapes(variables), _shapes(x))
    folds = []
    for bn, path, bn_input in norms:
        producers = [layer for layer, out in layers if out is bn_input]
        if not producers:
            continue
        if bn.axis != -1 or not bn.use_bias:
            raise UserError(f"BatchNorm {path} after a layer has axis={bn.axis}, "
                            f"use_bias={bn.use_bias}: folding needs axis=-1 and use_bias=True")
        folds.append(BatchNormFold(producers[0], path, bn.epsilon))
    for key in ("layer", "bn"):
        names = [getattr(f, key) for f in folds]
        if len(set(names)) != len(names):
            raise UserError(f"a module is folded twice ({names}): modules called more than once "
                            "cannot be folded; call each conv and BatchNorm once")
    return tuple(folds)


def fold_batchnorm(variables, folds: tuple[BatchNormFold, ...]):
    """Variables with each BatchNorm of `folds` merged into its layer (see the module doc)."""
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    stats = traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
    for f in folds:
        kernel = params[f"{f.layer}/kernel"]
        gamma = params.get(f"{f.bn}/scale", jnp.ones(kernel.shape[-1], kernel.dtype))
        r = jax.lax.rsqrt(stats[f"{f.bn}/var"] + f.epsilon)
        bias = params.get(f"{f.layer}/bias", jnp.zeros(kernel.shape[-1], kernel.dtype))
        params[f"{f.layer}/kernel"] = kernel * (gamma * r)
        params[f"{f.bn}/bias"] = (bias - stats[f"{f.bn}/mean"]) * r * gamma + params[f"{f.bn}/bias"]
        if f"{f.layer}/bias" in params:
            params[f"{f.layer}/bias"] = jnp.zeros_like(bias)
    return {**variables, "params": traverse_util.unflatten_dict(params, sep="/")}


@contextlib.contextmanager
def skip_folded_batchnorm(folds: tuple[BatchNormFold, ...]):
    """Within the context, each folded BatchNorm call returns x + its (folded) bias."""
    folded = {f.bn for f in folds}

    def skip(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "__call__" and isinstance(module, nn.BatchNorm)
                and "/".join(module.path) in folded):
            return args[0] + module.variables["params"]["bias"]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(skip):
        yield
