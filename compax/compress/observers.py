"""Observers: quantization parameters from observed values, as `torch.ao.quantization.observer`.

Quantization parameters from a range [min, max] (`_calculate_qparams` of PyTorch's observers):

    affine:     s = (max(max, 0) - min(min, 0)) / (qmax - qmin),  s = max(s, eps),
                z = clip(qmin - round(min(min, 0) / s), qmin, qmax)
    symmetric:  s = max(-min(min, 0), max(max, 0)) / ((qmax - qmin) / 2),  s = max(s, eps),  z = 0

with eps the float32 machine epsilon and round half to even. Symmetric int8 weights therefore use
s = max|w| / 127.5 on [-128, 127] (the largest weight rounds to 128 and is clipped to 127), and 4-bit
weights s = max|w| / 7.5 on [-8, 7], which is what a PyTorch per-channel symmetric observer with
quant_min=-8, quant_max=7 gives.

Ranges: `minmax` (MinMaxObserver), `per_channel_minmax` (PerChannelMinMaxObserver), and the
HistogramObserver's: a `histogram` of the values (torch.histc binning, 2048 bins over [min, max])
and `histogram_range`, the min/max that `HistogramObserver._non_linear_param_search` picks by
minimising the L2 error of quantizing the histogram to `dst_nbins` levels; `histogram_start` and
`histogram_merge`, the HistogramObserver fed batch by batch (each batch's histogram merged into the
running one by re-binning). `choose_qparams`: ATen's ChooseQuantizationParams, the per-call
parameters of PyTorch's dynamic quantization.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

EPS = float(np.finfo(np.float32).eps)
BINS = 2048


def _divide(a, b):
    """a / b with IEEE float32 division, for finite a.

    XLA's CPU simplifier turns a division by a constant or by a broadcast scalar into a
    multiplication by the reciprocal, which differs in the last bit for many values. The divisor is
    therefore made an array of a's shape (and batch axes, under vmap) behind an optimization
    barrier, so that the results equal PyTorch's.
    """
    a = jnp.asarray(a, jnp.float32)
    return a / jax.lax.optimization_barrier(a * 0 + jnp.asarray(b, jnp.float32))


def minmax(x):
    """(min, max) of all values, float32 scalars."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.min(x), jnp.max(x)


def per_channel_minmax(x, axis: int = -1):
    """(min, max) per channel along `axis`, each of shape (x.shape[axis],)."""
    x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, 0).reshape(x.shape[axis], -1)
    return jnp.min(x, axis=1), jnp.max(x, axis=1)


def affine_qparams(min_val, max_val, qmin: int, qmax: int):
    """(scale float32, zero point int32) of per-tensor/per-channel affine quantization on [qmin, qmax]."""
    min_neg = jnp.minimum(jnp.asarray(min_val, jnp.float32), 0.0)
    max_pos = jnp.maximum(jnp.asarray(max_val, jnp.float32), 0.0)
    scale = jnp.maximum(_divide(max_pos - min_neg, qmax - qmin), jnp.float32(EPS))
    zero_point = qmin - jnp.round(_divide(min_neg, scale)).astype(jnp.int32)
    return scale, jnp.clip(zero_point, qmin, qmax)


def symmetric_qparams(min_val, max_val, qmin: int, qmax: int):
    """(scale float32, zero point 0 int32) of symmetric quantization on a signed [qmin, qmax]."""
    min_neg = jnp.minimum(jnp.asarray(min_val, jnp.float32), 0.0)
    max_pos = jnp.maximum(jnp.asarray(max_val, jnp.float32), 0.0)
    amax = jnp.maximum(-min_neg, max_pos)
    scale = jnp.maximum(_divide(amax, (qmax - qmin) / 2), jnp.float32(EPS))
    return scale, jnp.zeros(scale.shape, jnp.int32)


def histogram(x, lo, hi, bins: int = BINS):
    """int32 counts of `x` in `bins` equal bins over [lo, hi], binned as `torch.histc`.

    Bin of v: trunc((v - lo) * bins / (hi - lo)) in float32, v = hi in the last bin; values
    outside [lo, hi] and NaNs are not counted; lo == hi is widened to [lo - 1, hi + 1].
    """
    x = jnp.asarray(x, jnp.float32).ravel()
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    same = lo == hi
    lo, hi = jnp.where(same, lo - 1, lo), jnp.where(same, hi + 1, hi)
    pos = _divide((x - lo) * jnp.float32(bins), hi - lo).astype(jnp.int32)
    pos = jnp.where(pos == bins, bins - 1, pos)
    inside = (x >= lo) & (x <= hi)
    return jnp.bincount(jnp.where(inside, pos, bins), length=bins + 1)[:bins]


def _quantization_error(hist, bin_width: float, start: int, end: int, dst_nbins: int) -> float:
    """HistogramObserver._compute_quantization_error: L2 error of quantizing bins start..end."""
    f32 = np.float32
    dst_bin_width = bin_width * (end - start + 1) / dst_nbins
    if dst_bin_width == 0.0:
        return 0.0
    src_begin = (np.arange(hist.size) - start).astype(f32) * f32(bin_width)
    src_end = src_begin + f32(bin_width)
    dst_of_begin = np.clip(np.floor_divide(src_begin, f32(dst_bin_width)), 0, dst_nbins - 1)
    dst_of_end = np.clip(np.floor_divide(src_end, f32(dst_bin_width)), 0, dst_nbins - 1)
    dst_of_begin_center = (dst_of_begin + f32(0.5)) * f32(dst_bin_width)
    dst_of_end_center = dst_of_end * f32(dst_bin_width) + f32(dst_bin_width / 2)
    density = hist / f32(bin_width)

    def l2(begin, end):
        return density * ((end * end * end - begin * begin * begin) / f32(3))

    half = f32(dst_bin_width / 2)
    norm = np.zeros(hist.size, f32)
    norm += l2(src_begin - dst_of_begin_center, np.ones(hist.size, f32) * half)
    norm += (dst_of_end - dst_of_begin - 1) * l2(-half, half)
    norm += l2(f32(-dst_bin_width / 2), src_end - dst_of_end_center)
    return float(norm.sum(dtype=f32))


# The quantile bounds of the search, alpha = 0 + 1e-5 + ... and beta = 1 - 1e-5 - ..., each step
# rounded to float64 as the Python loop of PyTorch rounds it.
_STEPS = 100_001
_ALPHAS = np.add.accumulate(np.r_[0.0, np.full(_STEPS, 1e-5)])
_BETAS = np.subtract.accumulate(np.r_[1.0, np.full(_STEPS, 1e-5)])


def _non_linear_param_search(hist, min_val, max_val, dst_nbins: int):
    """Port of HistogramObserver._non_linear_param_search (PyTorch 2.x), float for float.

    Starting from all bins, the bounds move inwards by quantiles of 1e-5 (the side that would drop
    more bins moves), and the search stops when the L2 quantization error would grow. PyTorch's loop
    spends most of its up to 10^5 iterations moving beta without dropping a bin; those runs are
    skipped here in one search over the precomputed betas, which visits the same states. Returns
    the new (min, max) as a float32 array [min, max].
    """
    f32 = np.float32
    hist = np.asarray(hist, f32)
    min_val, max_val = f32(min_val), f32(max_val)
    bins = hist.size
    total = float(hist.sum(dtype=f32))
    # torch.cumsum on the CPU accumulates float32 in double; it matters for the fractional
    # counts of merged histograms (`histogram_merge`).
    csum = np.cumsum(hist, dtype=np.float64).astype(f32)
    # Thresholds compare as float32, as a float32 tensor element against a Python float.
    below, above = (_ALPHAS * total).astype(f32), (_BETAS * total).astype(f32)
    bin_width_item = (float(max_val) - float(min_val)) / bins
    ia, ib, start, end, norm_min = 0, 0, 0, bins - 1, math.inf
    while _ALPHAS[ia] < _BETAS[ib]:
        left, right = start, end
        while left < end and csum[left] < below[ia + 1]:
            left += 1
        while right > start and csum[right] > above[ib + 1]:
            right -= 1
        next_start, next_end = start, end
        if left - start > end - right:
            next_start, ia = left, ia + 1
        else:
            next_end, ib = right, ib + 1
        if next_start == start and next_end == end:
            # Beta keeps moving alone until the end bin would drop or the bounds meet.
            drops = np.flatnonzero(above[ib + 1:] < csum[end]) if end > start else []
            meets = np.flatnonzero(_BETAS[ib:] <= _ALPHAS[ia])
            ib += min(drops[0] if len(drops) else _STEPS, meets[0] if len(meets) else _STEPS)
            continue
        norm = _quantization_error(hist, bin_width_item, next_start, next_end, dst_nbins)
        if norm > norm_min:
            break
        norm_min, start, end = norm, next_start, next_end
    bin_width = (max_val - min_val) / f32(bins)
    return np.array([min_val + bin_width * f32(start), min_val + bin_width * f32(end + 1)], f32)


def histogram_range(hist, lo, hi, dst_nbins: int = 256):
    """The (min, max) HistogramObserver chooses for a `histogram` over [lo, hi].

    `dst_nbins` is 2**bits of the quantized dtype (256 for quint8, also with reduce_range, as in
    PyTorch). Runs on the host (`pure_callback`); jit- and vmap-compatible.
    """
    search = functools.partial(_non_linear_param_search, dst_nbins=dst_nbins)
    out = jax.pure_callback(search, jax.ShapeDtypeStruct((2,), jnp.float32), hist, lo, hi,
                            vmap_method="sequential")
    return out[0], out[1]


# ATen's SMALL_SCALE_THRESHOLD (quant_utils::ChooseQuantizationParams, as fbgemm's).
SMALL_SCALE = 6.1e-5


def choose_qparams(min_val, max_val, qmin: int, qmax: int):
    """(scale float32, zero point int32) as ATen's `quant_utils::ChooseQuantizationParams` (the
    parameters PyTorch's dynamic quantized Linear picks for its input at every call).

    [min, max] is widened to contain 0, s = (max - min) / (qmax - qmin) (0 becomes 0.1; below
    6.1e-5 it is raised to 6.1e-5 and [min, max] scaled with it) and the zero point is qmin - min / s
    or qmax - max / s, whichever adds the smaller terms, rounded half to even and clipped to
    [qmin, qmax]. Pass the reduced range (e.g. (0, 127)) for reduce_range. ATen computes s in
    double and rounds it to float; here it is one float32 division, which can differ in the last
    bit. For min <= 0 <= max and s above 6.1e-5 this is `affine_qparams`, up to that rounding.
    """
    f32 = jnp.float32
    lo = jnp.minimum(jnp.asarray(min_val, f32), 0.0)
    hi = jnp.maximum(jnp.asarray(max_val, f32), 0.0)
    levels = f32(qmax - qmin)
    scale = _divide(hi - lo, levels)
    scale = jnp.where((scale == 0) | jnp.isinf(1 / scale), f32(0.1), scale)
    small = scale < f32(SMALL_SCALE)
    amplifier = _divide(f32(SMALL_SCALE), scale)
    lo_small = jnp.where(lo == 0, 0.0, jnp.where(hi == 0, -f32(SMALL_SCALE) * levels, lo * amplifier))
    hi_small = jnp.where(lo == 0, f32(SMALL_SCALE) * levels, jnp.where(hi == 0, 0.0, hi * amplifier))
    lo, hi = jnp.where(small, lo_small, lo), jnp.where(small, hi_small, hi)
    scale = jnp.where(small, f32(SMALL_SCALE), scale)
    lo_steps, hi_steps = _divide(lo, scale), _divide(hi, scale)
    from_min, from_max = qmin - lo_steps, qmax - hi_steps
    from_min_error = abs(qmin) - jnp.abs(lo_steps)
    from_max_error = abs(qmax) - jnp.abs(hi_steps)
    zero_point = jnp.where(from_min_error < from_max_error, from_min, from_max)
    return scale, jnp.clip(jnp.round(zero_point), qmin, qmax).astype(jnp.int32)


# HistogramObserver fed batch by batch (PyTorch >= 2.5, `HistogramObserver.forward`): the first
# batch's histogram spans its [min, max]; every later batch is binned over the union of the
# running range and its own, and the running histogram, when that range grew, is re-binned into it
# (`_combine_histograms` / `_upscale_histogram`: each bin split into 16 equal parts whose midpoints
# fall into the new bins).
UPSAMPLE_RATE = 16


def _finite_minmax(x):
    """(min, max) of the finite values of x (HistogramObserver drops +-inf)."""
    x = jnp.asarray(x, jnp.float32).ravel()
    finite = jnp.isfinite(x)
    return jnp.min(jnp.where(finite, x, jnp.inf)), jnp.max(jnp.where(finite, x, -jnp.inf))


def torch_linspace(start, end, steps: int):
    """float32 `torch.linspace(start, end, steps)` as ATen's CPU kernel computes it element-wise:
    step = (end - start) / (steps - 1), then start + step * i for i < steps // 2 and
    end - step * (steps - 1 - i) above (its vectorized loop can differ in the last bit)."""
    start, end = jnp.asarray(start, jnp.float32), jnp.asarray(end, jnp.float32)
    step = _divide(end - start, steps - 1)
    i = jnp.arange(steps, dtype=jnp.float32)
    return jnp.where(i < steps // 2, start + step * i, end - step * (steps - 1 - i))


def _upscale_histogram(hist, orig_min, orig_max, new_min, new_max, rate: int = UPSAMPLE_RATE):
    """HistogramObserver._upscale_histogram: `hist` over [orig_min, orig_max] re-binned into
    [new_min, new_max] (each bin split into `rate` parts, placed by their midpoints)."""
    bins = hist.shape[0]
    fine = jnp.repeat(hist, rate) / rate
    bin_size = _divide(orig_max - orig_min, bins * rate)
    mids = torch_linspace(orig_min, orig_max, bins * rate + 1)[:-1] + 0.5 * bin_size
    bounds = torch_linspace(new_min, new_max, bins + 1)
    index = jnp.clip(jnp.searchsorted(bounds, mids, side="right") - 1, 0, bins - 1)
    return jnp.bincount(index, weights=fine, length=bins).astype(jnp.float32)


def histogram_start(x, bins: int = BINS):
    """(float32 histogram, min, max) of a HistogramObserver after its first batch `x`."""
    lo, hi = _finite_minmax(x)
    return histogram(x, lo, hi, bins).astype(jnp.float32), lo, hi


def histogram_merge(hist, lo, hi, x):
    """(histogram, min, max) of a HistogramObserver in state (hist, lo, hi) after batch `x`
    (`HistogramObserver.forward`, PyTorch >= 2.5). jit- and vmap-compatible."""
    x_min, x_max = _finite_minmax(x)
    new_min, new_max = jnp.minimum(lo, x_min), jnp.maximum(hi, x_max)
    update = histogram(x, new_min, new_max, hist.shape[0]).astype(jnp.float32)
    # The running histogram of one value is that value's bin, with all its counts.
    single = histogram(jnp.reshape(lo, (1,)), new_min, new_max, hist.shape[0]) * jnp.sum(hist)
    upscaled = _upscale_histogram(hist, lo, hi, new_min, new_max)
    same = (new_min == lo) & (new_max == hi)
    merged = jnp.where(same, hist + update, jnp.where(lo == hi, single + update, update + upscaled))
    return merged, new_min, new_max
