"""Taps (intermediate activations) and Grad-CAM against torch hooks and a hand-written fake-quantized
LeNet-5, for float and quantized variants and populations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compax.compress import apply_compressed, fake_quant
from compax.errors import UserError
from compax.measure.gradcam import grad_cam
from compax.measure.saliency import heatmap_correlation
from compax.measure.taps import apply_with_taps, tap_points
from compax.member_vmap import chunked_vmap
from compax.models import get_model, init_variables
from compax.one_model import compress
from tests.test_analysis_saliency import N, lenet_setup, torch_twin
from tests.test_prune import random_variables


@pytest.fixture(scope="module")
def lenet():
    return lenet_setup()


@pytest.fixture(scope="module")
def lenet_cams(lenet):
    model, _, float32, w8a8, x, targets = lenet
    run = jax.jit(grad_cam, static_argnums=(0, 4))
    return np.asarray(run(model, float32, x, targets, 256)), np.asarray(run(model, w8a8, x, targets, 256))


@pytest.mark.parametrize("name, drop_last_block, last_conv, classifier, shape", [
    ("lenet5", False, "conv2", "fc3", (2, 10, 10, 4)),
    ("vgg6", False, "bn6", "fc3", (2, 8, 8, 32)),
    ("resnet18", False, "layer4_1", "fc", (2, 4, 4, 128)),
    ("squeezenet", False, "fire8", "classifier", (2, 4, 4, 128)),
    # layer ablation (Zee et al.): the stage before the dropped one is tapped
    ("lenet5", True, "conv1", "fc3", (2, 28, 28, 2)),
    ("vgg6", True, "bn5", "fc3", (2, 8, 8, 32)),
    ("resnet18", True, "layer3_1", "fc", (2, 8, 8, 64)),
    ("squeezenet", True, "fire7", "classifier", (2, 4, 4, 128)),
])
def test_tap_points_are_the_last_conv_stage_and_the_classifier(name, drop_last_block, last_conv,
                                                               classifier, shape):
    model = get_model(name, 10, 0.25).clone(drop_last_block=drop_last_block)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    points = tap_points(model, compress("float32", model, variables), jnp.zeros((2, 32, 32, 3)))
    assert (points.last_conv, points.classifier, points.last_conv_shape) == (last_conv, classifier, shape)


def torch_taps_and_cam(model, params, x, targets):
    """conv2's output z, d y_t / dz, fc3's input and the Grad-CAM map, from torch hooks."""
    torch = pytest.importorskip("torch")
    net = torch_twin(model, params)
    seen = {}
    net.conv2.register_forward_hook(lambda module, args, out: seen.update(z=out) or out.retain_grad())
    net.fc3.register_forward_hook(lambda module, args, out: seen.update(features=args[0]))
    logits = net(torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)))
    logits.gather(1, torch.tensor(np.asarray(targets), dtype=torch.int64)[:, None]).sum().backward()
    z, dz = seen["z"], seen["z"].grad
    alpha = dz.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((alpha * torch.relu(z)).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)

    def nhwc(t):
        return t.detach().numpy().transpose(0, 2, 3, 1)

    return nhwc(z), nhwc(dz), seen["features"].detach().numpy(), cam.detach().numpy()


@pytest.mark.torch
def test_float_taps_gradient_and_grad_cam_match_torch_hooks(lenet, lenet_cams):
    model, variables, float32, _, x, targets = lenet
    z, dz, features, cam = torch_taps_and_cam(model, variables["params"], x, targets)

    def target_logits(offsets):
        logits, taps = apply_with_taps(model, float32, x, offsets)
        return jnp.take_along_axis(logits, targets[:, None], axis=1).sum(), taps

    gradient, taps = jax.jit(jax.grad(target_logits, has_aux=True))(jnp.zeros(z.shape))
    np.testing.assert_allclose(taps["last_conv"], z, atol=1e-5)
    np.testing.assert_allclose(taps["features"], features, atol=1e-5)
    np.testing.assert_allclose(gradient, dz, atol=1e-6)
    np.testing.assert_allclose(lenet_cams[0], cam, atol=1e-4)


def hand_quantized_lenet(variables, qstate, x):
    """w8a8 LeNet-5 written out: (logits, conv2's output before its grid, fc3's input on its grid).
    Points as torch eager mode places them: input, conv1+relu, conv2+relu, fc1+relu, fc2+relu, fc3."""
    p = variables["params"]
    qmin, qmax = qstate.config.activation_range

    def q(v, point):
        return fake_quant(v, qstate.activation_scale[point], qstate.activation_zero_point[point], qmin, qmax)

    def conv(v, layer):
        return jax.lax.conv_general_dilated(v, p[layer]["kernel"], (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + p[layer]["bias"]

    def pool(v):
        return jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    z = conv(pool(q(jax.nn.relu(conv(q(x, 0), "conv1")), 1)), "conv2")
    v = pool(q(jax.nn.relu(z), 2))
    v = jnp.transpose(v, (0, 3, 1, 2)).reshape(v.shape[0], -1)
    v = q(jax.nn.relu(v @ p["fc1"]["kernel"] + p["fc1"]["bias"]), 3)
    features = q(jax.nn.relu(v @ p["fc2"]["kernel"] + p["fc2"]["bias"]), 4)
    return q(features @ p["fc3"]["kernel"] + p["fc3"]["bias"], 5), z, features


def test_quantized_taps_match_a_hand_written_fake_quantized_lenet(lenet):
    model, _, _, w8a8, x, _ = lenet
    logits, taps = jax.jit(apply_with_taps, static_argnums=0)(model, w8a8, x)
    np.testing.assert_array_equal(logits, jax.jit(apply_compressed, static_argnums=0)(model, w8a8, x))
    want = jax.jit(hand_quantized_lenet)(w8a8.variables, w8a8.qstate, x)
    step = float(w8a8.qstate.activation_scale[4])
    for got, expected, tolerance in zip((logits, taps["last_conv"], taps["features"]), want,
                                        (w8a8.qstate.activation_scale[5], 1e-5, step), strict=True):
        got, expected = np.asarray(got), np.asarray(expected)
        assert np.mean(np.abs(got - expected) <= 1e-5) > 0.99  # rare rounding flips at exact halves
        assert np.max(np.abs(got - expected)) <= float(tolerance) * 1.0001


@pytest.mark.parametrize("name, variant", [("lenet5", "float16"), ("lenet5", "dynamic_int8"),
                                           ("vgg6", "dynamic_int8"), ("vgg6", "weight_only_int8")])
def test_taps_keep_the_logits_of_every_kind_of_variant(name, variant):
    """float16 computes in half precision; weight_only_int8 and dynamic_int8 (layer inputs
    quantized at run time) fold BatchNorm, which VGG-6 taps (bn6)."""
    model = get_model(name, 10, 0.25)
    variables = random_variables(model, 0)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    compressed = compress(variant, model, variables, x)
    logits, taps = jax.jit(apply_with_taps, static_argnums=0)(model, compressed, x)
    want = jax.jit(apply_compressed, static_argnums=0)(model, compressed, x)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))
    assert taps["features"].dtype == taps["last_conv"].dtype == jnp.float32
    assert taps["features"].shape[0] == 4 and taps["features"].ndim == 2


def test_grad_cam_maps_are_normalised_for_float_and_quantized_variants(lenet_cams):
    float_cams, quantized_cams = lenet_cams
    for cams in lenet_cams:
        assert cams.shape == (N, 32, 32) and np.isfinite(cams).all() and cams.min() >= 0
        peak = cams.max(axis=(1, 2))
        assert np.all((np.abs(peak - 1) < 1e-6) | (peak == 0))
    assert not np.allclose(float_cams, quantized_cams, atol=1e-3)
    hcc = np.asarray(heatmap_correlation(jnp.asarray(float_cams), jnp.asarray(quantized_cams)))
    assert np.nanmean(hcc) > 0.5


def test_grad_cam_batches_and_population_vmap_give_the_same_maps(lenet, lenet_cams):
    model, _, _, w8a8, x, targets = lenet
    small = jax.jit(grad_cam, static_argnums=(0, 4))(model, w8a8, x, targets, 4)
    np.testing.assert_allclose(small, lenet_cams[1], atol=1e-5)
    population = jax.tree.map(lambda *a: jnp.stack(a), w8a8, lenet_setup(seed=1)[3])
    cams = chunked_vmap(lambda c, x, y: grad_cam(model, c, x, y), 2, 1)(population, x, targets)
    assert cams.shape == (2, N, 32, 32)
    np.testing.assert_allclose(cams[0], lenet_cams[1], atol=1e-5)


def test_offsets_of_the_wrong_shape_are_refused(lenet):
    model, _, float32, _, x, _ = lenet
    with pytest.raises(UserError, match="offsets"):
        apply_with_taps(model, float32, x, jnp.zeros((N, 5, 5, 16)))
