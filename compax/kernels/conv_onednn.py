"""Wide CPU convolutions on oneDNN, the library behind PyTorch's CPU convolutions.

XLA:CPU trains ResNet-18 at ~0.41x PyTorch's speed and SqueezeNet at ~0.64x, most of the gap in
convolutions with more channels than the direct kernels of `conv_cpu` take. Within
`cpu_convolutions()` the float32 NHWC layers those kernels do not take (more than 16 channels, or
strided) come here when oneDNN beats XLA on them (`wins`):

    oneDNN  iff  KH * KW * C_in <= 4 * B * OH * OW

i.e. unless the kernel dwarfs the images (weight-gradient GEMM of KH KW C_in x B OH OW rows).
Milliseconds per layer on this machine (2 cores, AMD EPYC with AVX-512, shared with another
process while measured, our side under nice 19; `train` = y, dx and dw, `fwd` = y; batch B;
min of 8 runs):

    layer (B)                       fwd XLA  oneDNN   train XLA  oneDNN
    ResNet-18 3x3 3->64 @32 (32)      1.04    0.60      3.05     2.66
    ResNet-18 3x3 64->64 @32 (32)    13.9    12.2      49.7     38.6
    ResNet-18 3x3/2 64->128 (32)      7.67    7.31     42.0     22.6
    ResNet-18 1x1/2 64->128 (32)      0.89    0.86     11.8      4.34
    ResNet-18 3x3 256->256 @8 (32)   13.5    10.6      47.6     35.8
    ResNet-18 3x3/2 256->512 (128)   38.8    28.6     130      102
    ResNet-18 1x1/2 256->512 (128)    3.37    4.24     27.8     15.3
    ResNet-18 3x3 512->512 @4 (128)  60.8    51.6     211      182
    ResNet-18 3x3 512->512 @4 (32)   19.7    18.2      59.4     83.1   <- XLA (4608 > 4 * 512)
    ResNet-18/8 3x3/2 8->16 (128)     1.52    0.67      6.84     4.37
    ResNet-18/8 3x3 32->32 @8 (128)   0.79    0.72      3.30     2.24
    SqueezeNet 1x1 64->16 @16 (32)    0.21    0.06      1.17     0.20
    SqueezeNet 3x3 48->192 @4 (32)    0.45    0.43      1.69     1.49
    SqueezeNet/4 1x1 32->4 @16 (128)  0.25    0.21      3.52     1.21
    SqueezeNet/4 3x3 12->48 @4 (128)  0.15    0.19      0.66     0.63
    VGG-6 3x3 32->32 @32 (32)         3.27    2.95     13.9      9.38

(/8, /4: the CPU-sized widths 0.125 and 0.25; @n: n x n input, 32 x 32 where not given.)
oneDNN's own OpenMP threading ran these layers at 0.01x to 0.8x XLA's speed while the other
process ran (its barriers wait a scheduler tick for a preempted thread: times in multiples of
~4 ms), so each thread of XLA's pool runs a single-threaded primitive on its range of the images
(`conv_onednn.cc`). Blocked layouts for the images too (format_tag::any with reorders, as
PyTorch's NCHW path does) were slower than NHWC (e.g. SqueezeNet 1x1 16->64: train 0.50 ms
against 0.32, VGG-6 3x3 32->32: 11.3 against 9.4), so only kernels are reordered. The rule's one
measured loss is the 512-channel layer at batch 32; the threshold lies between it (ratio 9) and
the wins at ratio 2.25. Two forward passes lose by ~20% (1x1/2 256->512, 3x3 12->48 at 4x4) while
their training steps win; a layer is routed whole, for training.

    y[b,p,q,o]     = sum_{i,j,c} x[b, s_h p + i - pad_top, s_w q + j - pad_left, c] w[i,j,c,o]
    dL/dx[b,h,v,c] = sum_{p,q,i,j,o : s_h p + i - pad_top = h, s_w q + j - pad_left = v}
                         g[b,p,q,o] w[i,j,c,o]                           (g = dL/dy)
    dL/dw[i,j,c,o] = sum_{b,p,q} g[b,p,q,o] x[b, s_h p + i - pad_top, s_w q + j - pad_left, c]

(x zero outside the image). `conv2d` is a `jax.custom_vjp` whose forward and two gradients are
the three FFI handlers of `conv_onednn.cc`, each a oneDNN primitive made once per shape and kept
in a cache; images and gradients stay NHWC, kernels are reordered from HWIO to oneDNN's chosen
(blocked) layout on every call (a kernel is mostly far smaller than the images). A call's images
are split into fixed ranges run on XLA's CPU thread pool, each by a single-threaded primitive
(the weight gradient adding the ranges' partial sums in a fixed order). Under `jax.vmap` each
call takes every member at once (`vmap_method="broadcast_all"`: x (M, B, H, W, C), w (M, KH, KW,
C, O)) and the pieces are members x ranges, so a member's result is the bits of its own call.

oneDNN comes from the wheels `onednn-cpu-gomp` and `onednn-devel-cpu-gomp` (requirements.txt;
CPU only, OpenMP threads from the system's libgomp); `conv_onednn.cc` is compiled against them on
first use (`compax.kernels.build`). Without them, without a C++ compiler or if compiling fails,
XLA's convolution is used with one warning; COMPAX_ONEDNN=0 (or `enable(False)`) turns oneDNN off,
COMPAX_CPU_KERNELS=0 every kernel. Layers are routed here by `conv_cpu.conv_general_dilated`
inside `cpu_convolutions()`.
"""
import functools
import importlib.metadata
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from compax.kernels import build

SOURCE = pathlib.Path(__file__).with_name("conv_onednn.cc")
TARGETS = {"forward": "CompaxOneDnnForward", "input_gradient": "CompaxOneDnnInputGradient",
           "weight_gradient": "CompaxOneDnnWeightGradient"}
WHEELS = ("onednn-cpu-gomp==2023.2.0", "onednn-devel-cpu-gomp==2023.2.0")

# COMPAX_ONEDNN=0 turns oneDNN off (XLA's convolution for the wide layers), as does enable(False).
_ENABLED = [os.environ.get("COMPAX_ONEDNN", "1") != "0"]


def enable(on: bool) -> None:
    """Turns oneDNN on or off for functions traced from now on."""
    _ENABLED[0] = bool(on)


def enabled() -> bool:
    """Whether functions traced now may use oneDNN."""
    return _ENABLED[0]


def _installed_file(distribution: str, path: str) -> pathlib.Path | None:
    """Where the installed `distribution` put its file ending in `path`; None if not installed."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((pathlib.Path(f.locate()).resolve() for f in files
                 if f.as_posix().endswith(f"/{path}")), None)


@functools.cache
def load() -> bool:
    """Compiles (once per source, flags and oneDNN location) and registers the handlers; False,
    with one warning, if oneDNN is not installed or compiling is impossible."""
    header = _installed_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
    library = _installed_file("onednn-cpu-gomp", "libdnnl.so")
    if header is None or library is None:
        logging.warning("oneDNN is not installed (pip install %s): XLA's convolution is used for "
                        "the wide layers", " ".join(WHEELS))
        return False
    lib_dir = library.parent
    return build.compile_and_register(SOURCE, TARGETS.values(), (
        f"-I{header.parents[2]}", "-fopenmp", f"-L{lib_dir}", "-ldnnl", f"-Wl,-rpath,{lib_dir}"))


def output_size(size: int, kernel: int, stride: int, pads: tuple[int, int]) -> int:
    """Output rows (or columns) of a convolution: floor((size + pads - kernel) / stride) + 1."""
    return (size + sum(pads) - kernel) // stride + 1


def _ffi(target: str, shape, first, second, strides, pads):
    (stride_h, stride_w), ((top, bottom), (left, right)) = strides, pads
    return jax.ffi.ffi_call(TARGETS[target], jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="broadcast_all")(
        first, second, stride_h=np.int64(stride_h), stride_w=np.int64(stride_w),
        pad_top=np.int64(top), pad_bottom=np.int64(bottom), pad_left=np.int64(left),
        pad_right=np.int64(right))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides, pads):
    """Convolution of x (B, H, W, C) with kernel (KH, KW, C, O), float32, `strides` (s_h, s_w),
    `pads` ((top, bottom), (left, right)) zero rows and columns (>= 0); y (B, OH, OW, O)."""
    b, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    shape = (b, output_size(h, kh, strides[0], pads[0]), output_size(w, kw, strides[1], pads[1]), o)
    return _ffi("forward", shape, x, kernel, strides, pads)


def _conv_forward(x, kernel, strides, pads):
    return conv2d(x, kernel, strides, pads), (x, kernel)


def _conv_backward(strides, pads, residuals, grad):
    """dx and dw; XLA drops dx where nothing needs it (an input layer)."""
    x, kernel = residuals
    return (_ffi("input_gradient", x.shape, grad, kernel, strides, pads),
            _ffi("weight_gradient", kernel.shape, x, grad, strides, pads))


conv2d.defvjp(_conv_forward, _conv_backward)


def wins(x_shape, kernel_shape, strides, pads) -> bool:
    """Whether oneDNN beats XLA's convolution on a layer: KH KW C_in <= 4 B OH OW (module doc)."""
    b, h, w, _ = x_shape
    kh, kw, c, _ = kernel_shape
    output_pixels = output_size(h, kh, strides[0], pads[0]) * output_size(w, kw, strides[1], pads[1])
    return kh * kw * c <= 4 * b * output_pixels
