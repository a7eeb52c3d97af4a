"""Fake quantization and observers against NumPy references and PyTorch."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compax.compress import dequantize, fake_quant, quantize
from compax.compress.observers import (
    _non_linear_param_search,
    affine_qparams,
    histogram,
    histogram_range,
    minmax,
    per_channel_minmax,
    symmetric_qparams,
)

F32 = np.float32


def np_fake_quant(x, scale, zero_point, qmin, qmax, axis=None):
    """NumPy reference: q = clip(round_half_even(x * f32(1 / s)) + z); x' = (q - z) s; STE mask."""
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    s = np.asarray(scale, F32).reshape(shape)
    z = np.asarray(zero_point, F32).reshape(shape)
    r = np.round(x.astype(F32) * (F32(1) / s)) + z
    return (np.clip(r, qmin, qmax) - z) * s, (r >= qmin) & (r <= qmax)


def qrange(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@st.composite
def quant_case(draw):
    """Values with exact halves and clipping, bit width 2..8, per tensor or per channel."""
    bits, signed = draw(st.integers(2, 8)), draw(st.booleans())
    qmin, qmax = qrange(bits, signed)
    channels = draw(st.integers(1, 4))
    per_channel = draw(st.booleans())
    n = channels if per_channel else 1
    scale = np.asarray(draw(st.lists(st.floats(1e-3, 1.0), min_size=n, max_size=n)), F32)
    zero_point = np.asarray(draw(st.lists(st.integers(qmin, qmax), min_size=n, max_size=n)),
                            np.int32) if not signed else np.zeros(n, np.int32)
    codes = np.asarray(draw(st.lists(st.integers(-300, 300), min_size=6 * channels,
                                     max_size=6 * channels)), F32).reshape(6, channels)
    halves = np.asarray(draw(st.lists(st.booleans(), min_size=6 * channels,
                                      max_size=6 * channels))).reshape(6, channels)
    x = ((codes + 0.5 * halves) * (scale if per_channel else scale[0])).astype(F32)
    if not per_channel:
        scale, zero_point = scale[0], zero_point[0]
    return x, scale, zero_point, qmin, qmax, 1 if per_channel else None


@settings(max_examples=60, deadline=None)
@given(quant_case())
def test_fake_quant_matches_numpy_with_ties_clipping_and_gradient(case):
    x, scale, zero_point, qmin, qmax, axis = case
    want, passed = np_fake_quant(x, scale, zero_point, qmin, qmax, axis)
    got = fake_quant(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(zero_point), qmin, qmax, axis)
    np.testing.assert_array_equal(np.asarray(got), want)
    q = quantize(x, scale, zero_point, qmin, qmax, axis)
    np.testing.assert_array_equal(np.asarray(dequantize(q, scale, zero_point, axis)), want)
    grad = jax.grad(lambda v: jnp.sum(fake_quant(v, scale, zero_point, qmin, qmax, axis) * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.where(passed, 3.0, 0.0))


def test_fake_quant_rounds_half_to_even_and_works_under_vmap():
    x = jnp.asarray([0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0], F32)
    np.testing.assert_array_equal(fake_quant(x, 1.0, 0, -128, 127), [0, 2, 2, 0, -2, 127, -128])
    scales = jnp.asarray([0.5, 1.0], F32)
    batched = jax.vmap(lambda s: fake_quant(x, s, 0, -128, 127))(scales)
    np.testing.assert_array_equal(batched[0], np.clip(np.round(x / 0.5), -128, 127) * 0.5)


@pytest.mark.torch
@settings(max_examples=30, deadline=None)
@given(quant_case())
def test_fake_quant_equals_torch(case):
    torch = pytest.importorskip("torch")
    x, scale, zero_point, qmin, qmax, axis = case
    got = np.asarray(fake_quant(x, scale, zero_point, qmin, qmax, axis))
    t = torch.from_numpy(x)
    if axis is None:
        want = torch.fake_quantize_per_tensor_affine(t, float(scale), int(zero_point), qmin, qmax)
    else:
        want = torch.fake_quantize_per_channel_affine(
            t, torch.from_numpy(scale), torch.from_numpy(zero_point), axis, qmin, qmax)
    np.testing.assert_array_equal(got, want.numpy())


def np_affine(lo, hi, qmin, qmax):
    lo, hi = min(F32(lo), F32(0)), max(F32(hi), F32(0))
    s = max(F32(hi - lo) / F32(qmax - qmin), np.finfo(F32).eps)
    return s, int(np.clip(qmin - np.round(lo / s), qmin, qmax))


@settings(max_examples=60, deadline=None)
@given(st.floats(-50, 0), st.floats(0, 50), st.sampled_from([(0, 127), (0, 255), (0, 15)]))
def test_affine_qparams_match_torch_formula(lo, hi, qrange_):
    scale, zero_point = affine_qparams(jnp.float32(lo), jnp.float32(hi), *qrange_)
    want_scale, want_zero_point = np_affine(lo, hi, *qrange_)
    assert float(scale) == want_scale and int(zero_point) == want_zero_point


def test_symmetric_per_channel_scales_are_exact_divisions():
    w = np.random.default_rng(0).normal(size=(3, 3, 8, 500)).astype(F32)
    lo, hi = per_channel_minmax(jnp.asarray(w), -1)
    np.testing.assert_array_equal(lo, w.reshape(-1, 500).min(0))
    for qmin, qmax in [(-128, 127), (-8, 7)]:
        scale, zero_point = symmetric_qparams(lo, hi, qmin, qmax)
        amax = np.maximum(-np.minimum(lo, 0), np.maximum(hi, 0))
        np.testing.assert_array_equal(scale, amax / F32((qmax - qmin) / 2))
        assert not np.any(zero_point)
        # Under vmap too (a batched divisor must not become a multiplication by the reciprocal).
        batched, _ = jax.vmap(symmetric_qparams, in_axes=(0, 0, None, None))(
            jnp.stack([lo, lo * 3]), jnp.stack([hi, hi * 3]), qmin, qmax)
        np.testing.assert_array_equal(batched[1], 3 * amax / F32((qmax - qmin) / 2))


@pytest.mark.torch
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_and_activation_observers_equal_torchs(bits):
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

    rng = np.random.default_rng(bits)
    w = rng.normal(size=(16, 6, 5, 5)).astype(F32)  # torch layout, channel axis 0
    qmin, qmax = qrange(bits, True)
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, quant_min=qmin,
                                        quant_max=qmax, qscheme=torch.per_channel_symmetric)
    observer(torch.from_numpy(w))
    want_scale, want_zero_point = observer.calculate_qparams()
    scale, zero_point = symmetric_qparams(*per_channel_minmax(jnp.asarray(w), 0), qmin, qmax)
    np.testing.assert_array_equal(np.asarray(scale), want_scale.numpy())
    np.testing.assert_array_equal(np.asarray(zero_point), want_zero_point.numpy())
    x = rng.normal(0.3, 2.0, size=10_000).astype(F32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        act = MinMaxObserver(reduce_range=True)
    act(torch.from_numpy(x))
    want_scale, want_zero_point = act.calculate_qparams()
    scale, zero_point = affine_qparams(*minmax(x), 0, 127)
    assert float(scale) == want_scale.item() and int(zero_point) == want_zero_point.item()


def test_histogram_bins_like_histc_in_float32():
    rng = np.random.default_rng(1)
    x = rng.normal(size=50_000).astype(F32)
    lo, hi = x.min(), x.max()
    pos = np.minimum((((x - lo) * F32(2048)) / (hi - lo)).astype(np.int64), 2047)
    np.testing.assert_array_equal(histogram(x, lo, hi), np.bincount(pos, minlength=2048))
    np.testing.assert_array_equal(histogram(np.full(5, 2.0, F32), 2.0, 2.0, bins=4), [0, 0, 5, 0])


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["normal", "relu", "outliers", "uniform", "few", "constant"])
def test_histogram_observer_equals_torchs(kind):
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import HistogramObserver

    rng = np.random.default_rng(7)
    x = {"normal": rng.normal(size=30_000),
         "relu": np.maximum(rng.normal(0.2, 1.0, size=(16, 6, 28, 28)), 0),
         "outliers": np.r_[rng.normal(size=20_000), 60.0, -25.0],
         "uniform": rng.uniform(-1, 3, size=20_000),
         "few": rng.normal(size=37),
         "constant": np.full(100, 0.5)}[kind].astype(F32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        observer = HistogramObserver(reduce_range=True)
    observer(torch.from_numpy(x))
    want_scale, want_zero_point = observer.calculate_qparams()
    lo, hi = minmax(x)
    hist = histogram(x, lo, hi)
    np.testing.assert_array_equal(np.asarray(hist, F32), observer.histogram.numpy())
    new_lo, new_hi = histogram_range(hist.astype(jnp.float32), lo, hi, 256)
    torch_lo, torch_hi = observer._non_linear_param_search()
    assert (float(new_lo), float(new_hi)) == (torch_lo.item(), torch_hi.item())
    scale, zero_point = affine_qparams(new_lo, new_hi, 0, 127)
    assert float(scale) == want_scale.item() and int(zero_point) == want_zero_point.item()


def test_histogram_search_clips_a_heavy_tail_and_runs_under_vmap():
    x = np.random.default_rng(2).standard_t(2, size=100_000).astype(F32)  # -474.6 .. 262.5
    hist = np.asarray(histogram(x, x.min(), x.max()), F32)
    lo, hi = _non_linear_param_search(hist, x.min(), x.max(), 256)
    assert lo == x.min() and 100 < hi < 0.9 * x.max()  # the upper tail is clipped
    batched = jax.jit(jax.vmap(histogram_range, in_axes=(0, 0, 0)))(
        jnp.stack([hist, hist]), jnp.full(2, x.min()), jnp.full(2, x.max()))
    np.testing.assert_array_equal(batched[1], [hi, hi])
