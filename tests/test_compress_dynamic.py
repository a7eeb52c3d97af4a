"""Dynamic int8 (quantize_dynamic), float16 storage (TFLite float16) and batch-wise histogram
calibration (HistogramObserver fed a DataLoader), against PyTorch where it has them."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compax import registrations  # noqa: F401  (registers the steps)
from compax.compress import apply_compressed, int8_apply, registry, size_bytes
from compax.compress.observers import (
    affine_qparams,
    choose_qparams,
    histogram_merge,
    histogram_range,
    histogram_start,
)
from compax.compress.size import storage_bytes
from compax.config import base_config
from compax.errors import UserError
from compax.models import get_model
from compax.one_model import compress
from tests.test_prune import random_variables

TEST = 300  # images[:TEST] calibrate, images[TEST:] are evaluated


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (600, 32, 32, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def lenet():
    model = get_model("lenet5", 43)
    return model, random_variables(model, 0)


def made(recipe: str, model, variables, calib):
    """The compressed `variables` (one model) of recipe text `recipe`."""
    ctx = registry.Context(calib_images=jnp.asarray(calib))
    population = jax.tree.map(lambda a: jnp.asarray(a)[None], variables)
    variant = registry.run_recipe(registry.parse_recipe(recipe, "test"), model, population, ctx)
    return jax.tree.map(lambda a: a[0], variant.compressed)


@pytest.mark.torch
def test_dynamic_int8_agrees_with_torch_quantize_dynamic(lenet, images):
    """Dense layers only, as quantize_dynamic's default: each Linear's input quantized per tensor
    over the call's 300 images, quint8 with reduce_range (scale max / 127 after ReLU); the
    convolutions in float in both."""
    pytest.importorskip("torch")
    from torch_reference.quantization import torch_dynamic

    model, variables = lenet
    x = images[TEST:]
    c = made("dynamic_quantize(weight_bits=8,layers=dense)", model, variables, images[:1])
    assert (c.weight_bits, c.activation_bits) == (8, 8) and c.qstate.config.dynamic
    assert set(c.qstate.weight_scale) == {"fc1/kernel", "fc2/kernel", "fc3/kernel"}
    ours = np.asarray(jax.jit(apply_compressed, static_argnums=0)(model, c, x))
    integer = np.asarray(jax.jit(int8_apply, static_argnums=0)(model, c.variables, c.qstate, x))
    float_logits, theirs = torch_dynamic(model, variables["params"], np.asarray(x))
    # fbgemm accumulates the codes in int32 and scales the sums to float, as int8_apply does: the
    # same up to float rounding of that scaling (measured: 0 here, 1e-7 of the logits' range on a
    # trained LeNet-5). Fake quantization accumulates dequantized values in float, which rounds
    # apart by 1e-7 relative and now and then moves a code of the next layer's input by one
    # (measured: max 2e-8 here; on a trained LeNet-5 and 2,000 images 0.05% of the logits, by at
    # most 0.05 of 39), so it is held to the same codes almost everywhere and to the same argmax.
    effect = np.max(np.abs(theirs - float_logits))  # what dynamic quantization changes: 1.3e-3
    scale = np.max(np.abs(theirs))  # 0.15
    assert effect > 5e-3 * scale
    assert np.max(np.abs(integer - theirs)) <= 1e-5 * scale
    assert np.mean(np.abs(ours - theirs) <= 1e-6 * scale) >= 0.999
    assert np.max(np.abs(ours - theirs)) <= 0.5 * effect
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.99


def test_dynamic_int8_quantizes_every_layer_input_per_call(lenet, images):
    """dynamic_int8: all conv and dense inputs, ranges of the whole call; jit, vmap and grad."""
    model, variables = lenet
    x = images[TEST:TEST + 40]
    c = compress("dynamic_int8", model, variables, images[:1])
    assert len(c.qstate.weight_scale) == 5 and c.qstate.activation_scale.shape == (0,)
    apply = jax.jit(apply_compressed, static_argnums=0)
    logits = np.asarray(apply(model, c, x))
    weight_only = compress("weight_only_int8", model, variables, images[:1])
    np.testing.assert_array_equal(weight_only.variables["params"]["fc1"]["kernel"],
                                  c.variables["params"]["fc1"]["kernel"])
    assert size_bytes(c) == size_bytes(weight_only)
    assert not np.allclose(logits, np.asarray(apply(model, weight_only, x)), rtol=0, atol=1e-6)

    # By hand: every layer input fake-quantized with the qparams of its range over the 40 images.
    p = c.variables["params"]

    def q(v):
        scale, zero_point = choose_qparams(v.min(), v.max(), 0, 127)
        return (jnp.clip(jnp.round(v * (1 / scale)) + zero_point, 0, 255) - zero_point) * scale

    def conv(v, layer):
        return jax.lax.conv_general_dilated(q(v), p[layer]["kernel"], (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) \
            + p[layer]["bias"]

    def pool(v):
        return v.reshape(v.shape[0], v.shape[1] // 2, 2, v.shape[2] // 2, 2, -1).max((2, 4))

    h = pool(jax.nn.relu(conv(pool(jax.nn.relu(conv(x, "conv1"))), "conv2")))
    h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)
    for layer in ("fc1", "fc2", "fc3"):
        h = q(h) @ p[layer]["kernel"] + p[layer]["bias"]
        h = jax.nn.relu(h) if layer != "fc3" else h
    np.testing.assert_allclose(logits, h, rtol=0, atol=1e-5 * float(np.abs(logits).max()))
    # Per call: the first image alone has other ranges than within the batch.
    alone = np.asarray(apply(model, c, x[:1]))
    assert not np.array_equal(alone[0], logits[0])
    np.testing.assert_allclose(alone[0], logits[0], atol=0.05 * float(np.abs(logits).max()))
    integer = np.asarray(jax.jit(int8_apply, static_argnums=0)(model, c.variables, c.qstate, x))
    np.testing.assert_allclose(integer, logits, rtol=0, atol=1e-5 * float(np.abs(logits).max()))

    population = jax.tree.map(lambda a, b: jnp.stack([a, b]), c,
                              compress("dynamic_int8", model, random_variables(model, 5),
                                       images[:1]))
    batched = jax.jit(jax.vmap(apply_compressed, in_axes=(None, 0, None)), static_argnums=0)(
        model, population, x)
    np.testing.assert_allclose(batched[0], logits, rtol=1e-5, atol=1e-6)
    saliency = jax.jit(jax.grad(lambda image: apply_compressed(model, c, image[None])[0, 0]))(x[0])
    assert np.isfinite(saliency).all() and np.any(saliency != 0)


def test_choose_qparams_follows_aten():
    # After ReLU: s = max / 127, z = 0; both signs: z from the error-minimising side; tiny ranges.
    scale, zero_point = choose_qparams(0.0, 2.54, 0, 127)
    assert float(scale) == np.float32(2.54) / np.float32(127) and int(zero_point) == 0
    scale, zero_point = choose_qparams(-1.0, 1.0, 0, 127)
    assert int(zero_point) == 64 and float(scale) == np.float32(2) / np.float32(127)
    assert tuple(map(float, choose_qparams(0.0, 0.0, 0, 127))) == (np.float32(0.1), 0.0)
    scale, zero_point = choose_qparams(-1e-4, 1e-4, 0, 127)
    assert float(scale) == np.float32(6.1e-5) and int(zero_point) == 64
    with pytest.raises(UserError):
        registry.parse_recipe("dynamic_quantize(layers=conv)", "test")


def test_float16_storage_rounds_weights_and_computes_in_float32(lenet, images):
    model, variables = lenet
    x = images[TEST:TEST + 50]
    stored = compress("float16_storage", model, variables)
    half = compress("float16", model, variables)
    assert (stored.dtype, stored.storage_dtype, stored.weight_bits, stored.activation_bits) == \
        ("float32", "float16", 16, 32)
    for leaf, original in zip(jax.tree.leaves(stored.variables), jax.tree.leaves(variables),
                              strict=True):
        assert leaf.dtype == jnp.float32
        np.testing.assert_array_equal(leaf, np.asarray(original).astype(np.float16).astype(np.float32))
    logits = jax.jit(apply_compressed, static_argnums=0)(model, stored, x)
    np.testing.assert_array_equal(logits, jax.jit(model.apply)(stored.variables, x))
    # 16 bits per stored value, as float16; computing in float32 is closer to the original.
    assert size_bytes(stored) == size_bytes(half) == storage_bytes(variables, weight_bits=16,
                                                                  float_bits=16)
    original = np.asarray(model.apply(variables, x))
    half_logits = np.asarray(jax.jit(apply_compressed, static_argnums=0)(model, half, x))
    assert np.max(np.abs(logits - original)) < np.max(np.abs(half_logits - original))
    assert registry.describe(registry.parse_recipe(registry.RECIPES["float16_storage"], "t")) == \
        "half_storage(dtype=float16)"


def test_histogram_batches_is_selectable_per_step_and_in_the_config():
    config = base_config()
    step = registry.parse_recipe("quantize(observer=histogram_batches)", "test", config)[0]
    assert step.quant_config().observer == "histogram_batches"
    config.compress.observer = "histogram_batches"
    assert registry.parse_recipe("quantize()", "t", config)[0].quant_config().observer == \
        "histogram_batches"


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["growing", "relu", "constant_first", "same_range"])
def test_batchwise_histogram_equals_torchs_histogram_observer(kind):
    """HistogramObserver fed five batches: the same min/max, histogram and qparams."""
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import HistogramObserver

    rng = np.random.default_rng(3)
    batches = [rng.standard_t(3, size=4000) * (1 + i) + 0.3 * i for i in range(5)]
    if kind == "relu":
        batches = [np.maximum(b, 0) for b in batches]
    elif kind == "constant_first":
        batches = [np.full(10, 0.5)] + batches[1:]
    elif kind == "same_range":
        batches = [np.r_[-4.0, rng.normal(size=3000), 4.0] for _ in range(5)]
    batches = [b.astype(np.float32) for b in batches]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        observer = HistogramObserver(reduce_range=True)
    for b in batches:
        observer(torch.from_numpy(b))
    state = histogram_start(batches[0])
    merge = jax.jit(histogram_merge)
    for b in batches[1:]:
        state = merge(*state, b)
    hist, lo, hi = map(np.asarray, state)
    assert (lo, hi) == (observer.min_val.item(), observer.max_val.item())
    # Re-binning places 1/16 bins by their midpoints; float rounding of torch.linspace can put a
    # midpoint on the other side of a bin edge, so counts may differ by fractions.
    np.testing.assert_allclose(hist, observer.histogram.numpy(), atol=0.07)
    assert abs(hist.sum() - observer.histogram.sum().item()) < 1e-2
    want_scale, want_zero_point = observer.calculate_qparams()
    scale, zero_point = affine_qparams(*histogram_range(jnp.asarray(hist), lo, hi, 256), 0, 127)
    assert float(scale) == want_scale.item() and int(zero_point) == want_zero_point.item()


def test_a_padded_last_batch_leaves_dynamic_ranges_to_the_real_images(lenet, images):
    """make_predict pads its last batch with copies of the last image, so per-call activation
    ranges, and so the dynamic-int8 logits of the real images, are those of the real images alone."""
    from compax.member_vmap import make_predict
    model, variables = lenet
    c = jax.tree.map(lambda a: jnp.asarray(a)[None], compress("dynamic_int8", model, variables,
                                                             images[:1]))
    x = np.asarray((images[TEST:TEST + 70] + 1) * 127.5).astype(np.uint8)
    mean, std = np.full(3, 127.5, np.float32), np.full(3, 64.0, np.float32)

    def predict(batch_size, images):
        return make_predict(lambda m, b: apply_compressed(model, m, b), mean, std, batch_size,
                            1)(c, images)
    logits = predict(32, x)  # batches of 32, 32 and 6 real images + 26 copies
    np.testing.assert_allclose(logits[0, 64:], predict(6, x[64:])[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(predict(6, x[60:66])[0, 4:], logits[0, 64:66], rtol=0, atol=1e-4)
