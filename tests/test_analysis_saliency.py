"""Saliency maps against torch autograd and finite differences, for float and quantized variants, and
their comparisons (pooling, MAD, HCC, ROI mass) against NumPy loops and SciPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from compax.errors import UserError
from compax.measure.saliency import (
    compare_saliency,
    heatmap_correlation,
    mean_absolute_deviation,
    most_changed,
    pooled,
    roi_saliency_mass,
    saliency_maps,
)
from compax.member_vmap import chunked_vmap
from compax.models import get_model
from compax.one_model import compress
from tests.test_prune import random_variables
from torch_reference.models import torch_twin

CLASSES = 43
N = 6


def lenet_setup(seed: int = 0, num: int = N):
    """An untrained LeNet-5 (43 classes), its float32 and w8a8 variants (calibrated on 16 random
    images), `num` normalised test images and random targets."""
    model = get_model("lenet5", CLASSES)
    variables = random_variables(model, seed)  # PyTorch's init, drawn with NumPy: no compilation
    key_calib, key_x, key_t = jax.random.split(jax.random.key(100 + seed), 3)
    calib = jax.random.normal(key_calib, (16, 32, 32, 3))
    x = jax.random.normal(key_x, (num, 32, 32, 3))
    targets = jax.random.randint(key_t, (num,), 0, CLASSES)
    return (model, variables, compress("float32", model, variables),
            compress("w8a8", model, variables, calib), x, targets)


@pytest.fixture(scope="module")
def lenet():
    return lenet_setup()


@pytest.fixture(scope="module")
def lenet_maps(lenet):
    model, _, float32, w8a8, x, targets = lenet
    run = jax.jit(saliency_maps, static_argnums=(0, 4))
    return np.asarray(run(model, float32, x, targets, 256)), np.asarray(run(model, w8a8, x, targets, 256))


@pytest.mark.torch
def test_float_saliency_matches_torch_autograd(lenet, lenet_maps):
    torch = pytest.importorskip("torch")
    model, variables, _, _, x, targets = lenet
    net = torch_twin(model, variables["params"])
    images = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    logits = net(images)
    logits.gather(1, torch.tensor(np.asarray(targets), dtype=torch.int64)[:, None]).sum().backward()
    maps = images.grad.abs().amax(dim=1).numpy()
    maps = maps / maps.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(lenet_maps[0], maps, atol=2e-5)


def test_float_saliency_matches_central_differences(lenet, lenet_maps):
    """d y_t / d x_j by (y_t(x + h e_j) - y_t(x - h e_j)) / 2h in float64, for the inputs of rows 8-11."""
    model, variables, _, _, x, targets = lenet
    target, h, rows = int(targets[0]), 1e-4, slice(8, 12)
    with jax.enable_x64(True):
        variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        image = np.asarray(x[0], np.float64)
        steps = np.zeros((4 * 32 * 3, *image.shape))
        steps[:, rows].reshape(len(steps), -1)[:] = np.eye(len(steps)) * h
        images = jnp.asarray(np.concatenate([image + steps, image - steps]))
        logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables64, images))
    difference = (logits[:len(steps), target] - logits[len(steps):, target]) / (2 * h)
    fd = np.abs(difference.reshape(4, 32, 3)).max(axis=-1)
    got = lenet_maps[0][0, rows]
    fd, got = fd / fd.max(), got / got.max()  # both normalised over these rows
    # The logit is piecewise linear: exact except where a step crosses a ReLU or max-pool kink.
    close = np.abs(fd - got) < 1e-4
    assert close.mean() > 0.98
    np.testing.assert_allclose(fd, got, atol=0.05)


def test_quantized_saliency_flows_through_straight_through_estimator(lenet_maps):
    float_maps, quantized_maps = lenet_maps
    assert np.all(np.isfinite(quantized_maps))
    np.testing.assert_allclose(quantized_maps.max(axis=(1, 2)), 1.0, rtol=1e-6)
    assert quantized_maps.min() >= 0
    assert not np.allclose(quantized_maps, float_maps, atol=1e-3)
    hcc = np.asarray(heatmap_correlation(jnp.asarray(float_maps), jnp.asarray(quantized_maps)))
    assert np.all(hcc > 0.5)


def test_batches_and_population_vmap_give_the_same_maps(lenet, lenet_maps):
    model, variables, _, w8a8, x, targets = lenet
    small = jax.jit(saliency_maps, static_argnums=(0, 4))(model, w8a8, x, targets, 4)  # 4 + 2 padded
    np.testing.assert_allclose(small, lenet_maps[1], atol=1e-6)
    other = lenet_setup(seed=1)[3]
    population = jax.tree.map(lambda *a: jnp.stack(a), w8a8, other)
    maps = chunked_vmap(lambda c, x, y: saliency_maps(model, c, x, y), 2, 1)(population, x, targets)
    assert maps.shape == (2, N, 32, 32)
    np.testing.assert_allclose(maps[0], lenet_maps[1], atol=1e-5)
    alone = jax.jit(saliency_maps, static_argnums=(0, 4))(model, other, x, targets, 256)
    np.testing.assert_allclose(maps[1], alone, atol=1e-5)


def test_saliency_of_a_batchnorm_resnet_is_the_input_gradient():
    model = get_model("resnet18", 10, 0.125)
    variables = random_variables(model, 0)  # NumPy: an eager ResNet init takes most of a minute
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    targets = jnp.array([0, 3, 9])
    maps = jax.jit(saliency_maps, static_argnums=(0, 4))(model, compress("float32", model, variables),
                                                         x, targets, 3)
    gradient = jax.jit(jax.grad(
        lambda x: jnp.sum(model.apply(variables, x, train=False)[jnp.arange(3), targets])))(x)
    want = np.abs(np.asarray(gradient)).max(axis=-1)
    np.testing.assert_allclose(maps, want / want.max(axis=(1, 2), keepdims=True), atol=1e-5)


def test_saliency_of_squeezenet_is_normalised_or_zero_for_dead_classes():
    model = get_model("squeezenet", 10, 0.125)
    variables = random_variables(model, 0)
    x = jax.random.normal(jax.random.key(1), (10, 32, 32, 3))
    maps = np.asarray(jax.jit(saliency_maps, static_argnums=(0, 4))(
        model, compress("float32", model, variables), x, jnp.arange(10), 256))
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    # A class whose ReLU'd 1x1 classifier conv is zero everywhere has a zero logit and gradient.
    dead = np.all(logits == 0, axis=0)
    assert np.all(maps[dead] == 0) and np.isfinite(maps).all() and maps.min() >= 0
    np.testing.assert_allclose(maps[~dead].max(axis=(1, 2)), 1.0, rtol=1e-6)
    assert (~dead).sum() >= 3


def test_saliency_rejects_mismatched_targets(lenet):
    model, _, float32, _, x, _ = lenet
    with pytest.raises(UserError, match="targets"):
        saliency_maps(model, float32, x, jnp.zeros(N + 1, jnp.int32))


def loop_pooled(maps, size, stride):
    n, h, w = maps.shape
    out = np.zeros((n, (h - size) // stride + 1, (w - size) // stride + 1))
    for i in range(n):
        for r in range(out.shape[1]):
            for c in range(out.shape[2]):
                out[i, r, c] = maps[i, r * stride:r * stride + size, c * stride:c * stride + size].mean()
    return out


def random_maps(seed, n=N, size=32):
    return jax.random.uniform(jax.random.key(seed), (n, size, size))


def test_pooled_matches_loop_on_real_shapes():
    maps = random_maps(0)
    got = np.asarray(pooled(maps))
    assert got.shape == (N, 10, 10)
    np.testing.assert_allclose(got, loop_pooled(np.asarray(maps), 3, 3), atol=1e-6)
    a, b = np.asarray(maps), np.asarray(random_maps(1))
    mad = np.abs(loop_pooled(a, 3, 3) - loop_pooled(b, 3, 3)).mean(axis=(1, 2))
    np.testing.assert_allclose(mean_absolute_deviation(maps, random_maps(1)), mad, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(size=st.integers(1, 4), stride=st.integers(1, 4), height=st.integers(4, 12), seed=st.integers(0, 99))
def test_pooled_matches_loop_for_any_window(size, stride, height, seed):
    maps = np.random.default_rng(seed).random((2, height, height + 1)).astype(np.float32)
    np.testing.assert_allclose(pooled(jnp.asarray(maps), size, stride), loop_pooled(maps, size, stride),
                               atol=1e-6)


def test_heatmap_correlation_matches_scipy_pearson():
    a, b = random_maps(2), random_maps(3) * 0.3 + random_maps(2) * 0.7
    want = [stats.pearsonr(np.ravel(p), np.ravel(q)).statistic for p, q in zip(a, b, strict=True)]
    np.testing.assert_allclose(heatmap_correlation(a, b), want, atol=1e-5)


def test_constant_maps_have_undefined_correlation():
    a = random_maps(4, n=3)
    constant = a.at[1].set(0.0).at[2].set(0.5)
    hcc = np.asarray(heatmap_correlation(a, constant))
    assert np.isfinite(hcc[0]) and np.all(np.isnan(hcc[1:]))
    summary = compare_saliency(a, constant)
    np.testing.assert_allclose(summary["hcc_mean"], hcc[0], rtol=1e-6)


map_arrays = hnp.arrays(np.float32, (3, 12, 12), elements=st.floats(0, 1, width=32))


@settings(max_examples=30, deadline=None)
@given(maps=map_arrays, other=map_arrays)
def test_identical_maps_have_no_deviation_and_full_correlation(maps, other):
    maps, other = jnp.asarray(maps), jnp.asarray(other)
    np.testing.assert_array_equal(mean_absolute_deviation(maps, maps), 0.0)
    mad = np.asarray(mean_absolute_deviation(maps, other))
    assert np.all((mad >= 0) & (mad <= 1))
    np.testing.assert_allclose(mad, mean_absolute_deviation(other, maps), atol=1e-7)
    hcc = np.asarray(heatmap_correlation(maps, maps))
    varied = np.ptp(np.asarray(maps).reshape(3, -1), axis=1) > 1e-3
    np.testing.assert_allclose(hcc[varied], 1.0, atol=1e-4)
    cross = np.asarray(heatmap_correlation(maps, other))
    assert np.all(np.isnan(cross) | (np.abs(cross) <= 1 + 1e-5))


def loop_roi_mass(maps, boxes, sub=64):
    """Share of mass in each box, integrating each pixel over a sub x sub grid of points."""
    out = []
    offsets = (np.arange(sub) + 0.5) / sub
    for m, (x1, y1, x2, y2) in zip(maps, boxes, strict=True):
        inside = 0.0
        for r in range(m.shape[0]):
            for c in range(m.shape[1]):
                ys, xs = r + offsets, c + offsets
                inside += m[r, c] * np.mean((ys >= y1) & (ys < y2)) * np.mean((xs >= x1) & (xs < x2))
        out.append(inside / m.sum())
    return np.array(out)


def test_roi_saliency_mass_matches_loop_for_integer_and_fractional_boxes():
    maps = np.asarray(random_maps(5, n=4)) ** 3
    boxes = np.array([[0, 0, 32, 32], [4, 6, 20, 30], [3.3, 5.75, 17.5, 28.2], [-2, 30.5, 40, 33]],
                     np.float32)
    got = np.asarray(roi_saliency_mass(jnp.asarray(maps), jnp.asarray(boxes)))
    np.testing.assert_allclose(got, loop_roi_mass(maps, boxes), atol=1e-3)
    assert got[0] == pytest.approx(1.0)
    mask = np.zeros((32, 32), bool)
    mask[6:30, 4:20] = True
    assert got[1] == pytest.approx(maps[1][mask].sum() / maps[1].sum(), rel=1e-5)


def test_most_changed_takes_the_largest_deviations_first():
    mad = np.random.default_rng(0).random(100)
    top = most_changed(mad, 20)
    np.testing.assert_array_equal(top, np.argsort(mad)[::-1][:20])
    np.testing.assert_array_equal(most_changed(np.array([0.1, 0.3, 0.3, 0.2]), 3), [1, 2, 3])


def test_compare_saliency_summarises_pairs_and_vmaps_over_members():
    a, b = random_maps(6), random_maps(7)
    boxes = jnp.asarray(np.tile([[4.0, 4.0, 28.0, 28.0]], (N, 1)))
    result = jax.jit(compare_saliency)(a, b, boxes)
    np.testing.assert_allclose(result["mad_mean"], np.mean(result["mad"]), rtol=1e-6)
    np.testing.assert_allclose(result["hcc_mean"], np.mean(result["hcc"]), rtol=1e-5)
    share_a, share_b = roi_saliency_mass(a, boxes), roi_saliency_mass(b, boxes)
    np.testing.assert_allclose(result["roi_mass_original"], np.mean(share_a), rtol=1e-5)
    np.testing.assert_allclose(result["roi_mass_compressed"], np.mean(share_b), rtol=1e-5)
    np.testing.assert_allclose(result["roi_saliency_mass_change"], np.mean(share_b - share_a), atol=1e-6)
    batched = jax.jit(jax.vmap(compare_saliency, in_axes=(None, 0, None)))(a, jnp.stack([a, b]), boxes)
    np.testing.assert_allclose(batched["mad"][1], result["mad"], atol=1e-7)
    np.testing.assert_allclose(batched["mad_mean"][0], 0.0, atol=1e-7)
    assert set(compare_saliency(a, b)) == {"mad", "hcc", "mad_mean", "hcc_mean"}

