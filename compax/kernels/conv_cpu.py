"""Direct CPU convolutions for layers with few channels, swapped into flax models by interception.

XLA:CPU runs convolutions over few channels (LeNet-5's conv1, 3 -> 6, and conv2, 6 -> 16, both
5x5) several times slower than PyTorch's oneDNN: with them a LeNet-5 training step took ~5x as
long as PyTorch's, and its saliency maps ~4x. Models know nothing of this: within
`cpu_convolutions()` (a context manager, or a decorator) a `flax.linen.intercept_methods`
interceptor routes every `nn.Conv.__call__` to `conv_general_dilated` here, which computes eligible
convolutions (float32, NHWC/HWIO, stride 1, no dilation or groups, explicit, VALID or SAME padding,
at most `MAX_CHANNELS` input and output channels) with the C++ kernels of `conv_cpu.cc` through the
XLA FFI, on a single-device CPU backend only; other float32 NHWC convolutions without dilation or
groups (wide or strided layers) go to oneDNN where it beats XLA (`conv_onednn`), everything else
to XLA's convolution, as does every call outside the context (post-training quantization's jaxpr
interpreter must see XLA's convolution primitive). Interception acts while a function is traced:
enter the context inside the function that is jitted (or decorate it), not around a call of an
already compiled function.

    y[b,p,q,o]     = sum_{i,j,c} x[b,p+i,q+j,c] w[i,j,c,o]          (x zero-padded by the kernels)
    dL/dw[i,j,c,o] = sum_{b,p,q} g[b,p,q,o] x[b,p+i,q+j,c]
    dL/dx          = the forward kernel on g zero-padded by k-1 less the forward's padding, with
                     w rotated by 180 degrees and its channel axes swapped (XLA drops it for an
                     input layer)

Under `jax.vmap` (a population of members) each FFI call takes every member at once
(`vmap_method="broadcast_all"`: operands gain the leading member axes, an operand shared by the
members is broadcast): x (M, B, H, W, C) with w (M, KH, KW, C, O) gives y (M, B, OH, OW, O), each
member with its own kernel, and dw (M, KH, KW, C, O) each member's own sum; the C++ threads over
members x ranges of images, so one call keeps every core busy however small a member's batch. The
kernels are compiled on first use with the machine's C++ compiler (`$CXX`, else g++/c++; -O3
-march=native) into `$COMPAX_CACHE_DIR` (default ~/.cache/compax; `compax.kernels.build`); without
a compiler, or if compiling fails, XLA's convolution is used with one warning; COMPAX_CPU_KERNELS=0
turns every kernel off (these and oneDNN's), COMPAX_ONEDNN=0 oneDNN's alone. Results equal XLA's
up to float rounding (tests/test_kernels.py) and do not depend on thread timing.
"""
import contextlib
import functools
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compax.kernels import build, conv_onednn

MAX_CHANNELS = 16

SOURCE = pathlib.Path(__file__).with_name("conv_cpu.cc")
TARGETS = {"forward": "CompaxConvForward", "weight_gradient": "CompaxConvWeightGradient"}

# COMPAX_CPU_KERNELS=0 turns the kernels off (XLA's convolution everywhere), as does enable(False).
_ENABLED = [os.environ.get("COMPAX_CPU_KERNELS", "1") != "0"]


def enable(on: bool) -> None:
    """Turns the kernels on or off for functions traced from now on."""
    _ENABLED[0] = bool(on)


def _route_to_kernels(next_fun, args, kwargs, context):
    """Interceptor: an `nn.Conv` call runs with `conv_general_dilated` below as its convolution.

    flax's own `Conv.__call__` still does everything else (padding, dtype promotion, bias, masks,
    batch dimensions), and other interceptors, entered before or after this one, still see the call:
    the bound module's `conv_general_dilated` attribute is set for the duration of the call only.
    """
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, nn.Conv)
            or module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None):
        return next_fun(*args, **kwargs)
    object.__setattr__(module, "conv_general_dilated", conv_general_dilated)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "conv_general_dilated", None)


@contextlib.contextmanager
def cpu_convolutions():
    """While a function is traced within this context, eligible `nn.Conv` layers use the kernels.

    Use it inside the jitted function, around `model.apply` (or decorate the function:
    `@cpu_convolutions()`); it composes with `jax.grad` (input and weight gradients), `jax.vmap`
    and other interceptors. Off the CPU, on several devices, with COMPAX_CPU_KERNELS=0 or without
    a C++ compiler it changes nothing.
    """
    with nn.intercept_methods(_route_to_kernels):
        yield


@functools.cache
def load() -> bool:
    """Compiles (once per source, flags and jaxlib) and registers the kernels; False if impossible."""
    return build.compile_and_register(SOURCE, TARGETS.values())


def _ffi(target: str, shape, *operands, **attributes):
    return jax.ffi.ffi_call(TARGETS[target], jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="broadcast_all")(*operands, **attributes)


def _attributes(pads):
    (top, bottom), (left, right) = pads
    return dict(pad_top=np.int64(top), pad_bottom=np.int64(bottom), pad_left=np.int64(left),
                pad_right=np.int64(right))


def _forward(x, kernel, pads):
    """Stride-1 convolution of x (B, H, W, C), zero-padded by pads ((top, bottom), (left, right))
    inside the kernel, with kernel (KH, KW, C, O)."""
    b, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    (top, bottom), (left, right) = pads
    return _ffi("forward", (b, h + top + bottom - kh + 1, w + left + right - kw + 1, o), x, kernel,
                **_attributes(pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x, kernel, pads=((0, 0), (0, 0))):
    """Stride-1 convolution of x (B, H, W, C) with kernel (KH, KW, C, O), float32, x zero-padded by
    pads ((top, bottom), (left, right)), each at most the kernel's size - 1 (default: VALID)."""
    return _forward(x, kernel, pads)


def _conv_forward(x, kernel, pads):
    return _forward(x, kernel, pads), (x, kernel)


def _conv_backward(pads, residuals, grad):
    x, kernel = residuals
    dw = _ffi("weight_gradient", kernel.shape, x, kernel, grad, **_attributes(pads))
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = pads
    # The input gradient is a full convolution of the output gradient (padded by k - 1, less the
    # forward's padding) with the kernel rotated by 180 degrees and its channel axes swapped; XLA
    # drops it where nothing needs it (an input layer).
    dx = _forward(grad, jnp.flip(jnp.swapaxes(kernel, 2, 3), (0, 1)),
                  ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)))
    return dx, dw


conv2d.defvjp(_conv_forward, _conv_backward)


def _explicit_padding(lhs, rhs, window_strides, padding):
    """((top, bottom), (left, right)) of a lax padding argument of an NHWC / HWIO convolution
    (VALID, SAME and SAME_LOWER by XLA's rule), or None if it crops the input."""
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    return pads if min(min(pair) for pair in pads) >= 0 else None


def _kernel_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count, batch_group_count):
    """The explicit pads of a convolution that some kernel could take (kernels on, a single-device
    CPU backend, float32 NHWC / HWIO, no dilation or groups, no cropping), else None."""
    if not (_ENABLED[0] and jax.default_backend() == "cpu" and jax.device_count() == 1
            and lhs.dtype == rhs.dtype == jnp.float32 and lhs.ndim == 4
            and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
            and feature_group_count == batch_group_count == 1
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))):
        return None
    return _explicit_padding(lhs, rhs, tuple(window_strides), padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`, with eligible convolutions on the kernels: stride 1 with at most
    `MAX_CHANNELS` channels in and out on the direct kernels (see the module doc), others where
    oneDNN beats XLA (`conv_onednn.wins`) on oneDNN, the rest on XLA.

    Called by `nn.Conv` layers within `cpu_convolutions()`; may also be called directly.
    """
    strides = tuple(int(s) for s in window_strides)
    pads = _kernel_pads(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                        feature_group_count, batch_group_count)
    if (pads is not None and strides == (1, 1) and lhs.shape[-1] <= MAX_CHANNELS
            and rhs.shape[-1] <= MAX_CHANNELS and load()):
        # Pads up to the kernel's size - 1 are the kernels' own; larger ones are padded here.
        (kh, kw), ((top, bottom), (left, right)) = rhs.shape[:2], pads
        inner = ((min(top, kh - 1), min(bottom, kh - 1)), (min(left, kw - 1), min(right, kw - 1)))
        outer = tuple((a - i, b - j) for (a, b), (i, j) in zip(pads, inner, strict=True))
        if outer != ((0, 0), (0, 0)):
            lhs = jnp.pad(lhs, ((0, 0), *outer, (0, 0)))
        return conv2d(lhs, rhs, inner)
    if (pads is not None and conv_onednn.enabled() and conv_onednn.wins(lhs.shape, rhs.shape, strides, pads)
            and conv_onednn.load()):
        return conv_onednn.conv2d(lhs, rhs, strides, pads)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
