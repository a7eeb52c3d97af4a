"""Uniform affine quantization of float arrays, and fake quantization with a straight-through gradient.

    q  = clip(round(x * (1 / s)) + z, qmin, qmax)       (quantize)
    x' = (q - z) * s                                     (dequantize)

with round half to even, x / s computed as x times the float32 reciprocal of s: exactly PyTorch's
`fake_quantize_per_tensor_affine` / `fake_quantize_per_channel_affine` and `quantize_per_tensor`
(`nearbyint(x * inv_scale)` in ATen and fbgemm), which differ from x / s at some exact halves.
Symmetric quantization is z = 0. Scale and zero point are per tensor (scalars) or per channel
(vectors along `axis`); bit widths from 2 to 8 are just (qmin, qmax), e.g. (-128, 127), (-8, 7).

`fake_quant` has the straight-through estimator of Bengio et al. (2013) as PyTorch implements it:
dx'/dx = 1 where qmin <= round(x / s) + z <= qmax and 0 where the value was clipped; scale and zero
point get no gradient. It is what lets `jax.grad` see through a quantized model (saliency, attacks).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def broadcast_along(p, ndim: int, axis: int | None):
    """Per-channel `p` shaped to broadcast along `axis` of an array of rank `ndim` (None: as is)."""
    p = jnp.asarray(p)
    if axis is None:
        return p
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def _rounded(x, scale, zero_point, axis):
    """round(x * (1 / s)) + z in float32, before clipping."""
    x = x.astype(jnp.float32)
    inv = 1.0 / broadcast_along(scale, x.ndim, axis).astype(jnp.float32)
    return jnp.round(x * inv) + broadcast_along(zero_point, x.ndim, axis).astype(jnp.float32)


def quantize(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None):
    """Integer codes q = clip(round(x / s) + z, qmin, qmax) as int32."""
    return jnp.clip(_rounded(x, scale, zero_point, axis), qmin, qmax).astype(jnp.int32)


def dequantize(q, scale, zero_point, axis: int | None = None):
    """Float32 values (q - z) * s of integer codes."""
    z = broadcast_along(zero_point, q.ndim, axis).astype(jnp.float32)
    return (q.astype(jnp.float32) - z) * broadcast_along(scale, q.ndim, axis).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fake_quant(x, scale, zero_point, qmin, qmax, axis):
    q = jnp.clip(_rounded(x, scale, zero_point, axis), qmin, qmax)
    return dequantize(q, scale, zero_point, axis).astype(x.dtype)


def _fake_quant_fwd(x, scale, zero_point, qmin, qmax, axis):
    r = _rounded(x, scale, zero_point, axis)
    x_q = dequantize(jnp.clip(r, qmin, qmax), scale, zero_point, axis).astype(x.dtype)
    return x_q, ((r >= qmin) & (r <= qmax), scale, zero_point)


def _no_gradient(p):
    """Zero cotangent for a scale or zero point (float0 for integer zero points)."""
    p = jnp.asarray(p)
    if jnp.issubdtype(p.dtype, jnp.integer):
        return np.zeros(p.shape, jax.dtypes.float0)
    return jnp.zeros_like(p)


def _fake_quant_bwd(qmin, qmax, axis, residuals, g):
    passed, scale, zero_point = residuals
    return jnp.where(passed, g, jnp.zeros_like(g)), _no_gradient(scale), _no_gradient(zero_point)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "axis"))
def fake_quant(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None):
    """Quantize-dequantize x (see the module doc) with a straight-through gradient."""
    return _fake_quant(x, scale, zero_point, qmin, qmax, axis)
