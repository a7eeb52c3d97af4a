"""The direct CPU convolutions (compax.kernels.conv_cpu) against XLA's convolution and numpy, and
their interception into flax models, the train step, saliency and Grad-CAM; oneDNN's convolutions
(compax.kernels.conv_onednn) against XLA's, under vmap, in a model's gradient, and their routing."""

import contextlib
import functools
import pathlib
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from compax.compress import Compressed
from compax.kernels import build, conv_cpu, conv_onednn, cpu_convolutions
from compax.measure.gradcam import grad_cam
from compax.measure.saliency import saliency_maps
from compax.measure.taps import cpu_convolutions_for
from compax.models import get_model, init_variables

NHWC = ("NHWC", "HWIO", "NHWC")

pytestmark = pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler: the kernels are off")


def test_the_kernels_build_where_a_compiler_is_installed():
    """A compile error must fail here, not turn every kernel test into a test of XLA's fallback."""
    assert conv_cpu.load(), "conv_cpu.cc did not compile: see the warning above"


def xla_conv(x, w, padding):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)


def kernel_conv(x, w, padding):
    return conv_cpu.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)


@contextlib.contextmanager
def xla_only():
    """Functions traced within use XLA's convolution even inside cpu_convolutions()."""
    conv_cpu.enable(False)
    try:
        yield
    finally:
        conv_cpu.enable(True)


def kernel_calls(fn, *args) -> int:
    """How many kernel calls the jitted fn(*args) makes."""
    return jax.jit(fn).lower(*args).as_text().count("CompaxConv")


def assert_close(got, want, relative=2e-6):
    """Every leaf of `got` within `relative` times the largest |value| of `want`'s leaf."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=relative * float(jnp.abs(b).max()), rtol=0)


def numpy_conv(x, w):
    """VALID convolution by explicit sums over the kernel taps (float64)."""
    kh, kw = w.shape[:2]
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("bpqc,co->bpqo", x[:, i:i + oh, j:j + ow].astype(np.float64), w[i, j])
    return y


def value_and_vjp(conv, x, w, padding, cotangent):
    y, vjp = jax.vjp(jax.jit(lambda x, w: conv(x, w, padding)), x, w)
    return (y, *vjp(cotangent))


def random(key, *shapes):
    keys = jax.random.split(jax.random.key(key), len(shapes))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]


# LeNet-5's two layers at the training batch, a CPU-sized ResNet-18's padded 3x3 layer, a padded
# 3x3 layer, uneven pads with more output channels than one AVX-512 vector (two channel blocks), a
# 1x1 layer and rows narrower than a pixel block.
CASES = [((128, 32, 32, 3), (5, 5, 3, 6), "VALID"),
         ((128, 14, 14, 6), (5, 5, 6, 16), "VALID"),
         ((128, 32, 32, 8), (3, 3, 8, 8), "SAME"),
         ((5, 9, 11, 5), (3, 3, 5, 13), ((1, 1), (1, 1))),
         ((3, 9, 11, 2), (3, 3, 2, 24), ((2, 0), (0, 2))),
         ((2, 8, 8, 16), (1, 1, 16, 32), "VALID"),
         ((3, 6, 6, 3), (3, 3, 3, 7), "VALID")]


@pytest.mark.parametrize("x_shape,w_shape,padding", CASES)
def test_forward_and_gradients_equal_xla(x_shape, w_shape, padding):
    x, w = random(0, x_shape, w_shape)
    cotangent, = random(1, xla_conv(x, w, padding).shape)
    pads = lax.padtype_to_pads(x_shape[1:3], w_shape[:2], (1, 1), padding) if isinstance(
        padding, str) else padding
    expected = value_and_vjp(xla_conv, x, w, padding, cotangent)
    result = value_and_vjp(conv_cpu.conv2d, x, w, tuple(map(tuple, pads)), cotangent)
    for name, got, want in zip(("y", "dx", "dw"), result, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.abs(want).max()), rtol=0,
                                   err_msg=name)


def test_forward_equals_numpy_sums():
    x, w = random(2, (4, 32, 32, 3), (5, 5, 3, 6))
    np.testing.assert_allclose(conv_cpu.conv2d(x, w), numpy_conv(np.asarray(x), np.asarray(w)),
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 5), height=st.integers(1, 12), width=st.integers(1, 12),
       kh=st.integers(1, 5), kw=st.integers(1, 5), cin=st.integers(1, 16), cout=st.integers(1, 40),
       pads=st.lists(st.integers(0, 4), min_size=4, max_size=4), seed=st.integers(0, 2**16))
def test_any_shape_and_padding_equals_numpy(batch, height, width, kh, kw, cin, cout, pads, seed):
    """Forward, input and weight gradients on arbitrary small shapes and pads up to the kernel's
    size - 1 (every tail of the vector blocks, every border), against sums over the zero-padded
    image in float64."""
    kh, kw = min(kh, height), min(kw, width)
    top, bottom, left, right = (min(p, k - 1) for p, k in zip(pads, (kh, kh, kw, kw), strict=True))
    padding = ((top, bottom), (left, right))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, height, width, cin), dtype=np.float32)
    w = rng.standard_normal((kh, kw, cin, cout), dtype=np.float32)
    y, vjp = jax.vjp(lambda x, w: conv_cpu.conv2d(x, w, padding), jnp.asarray(x), jnp.asarray(w))
    x_padded = np.pad(x, ((0, 0), *padding, (0, 0))).astype(np.float64)
    np.testing.assert_allclose(y, numpy_conv(x_padded, w), atol=1e-4, rtol=1e-4)
    g = rng.standard_normal(y.shape, dtype=np.float32)
    windows = np.stack([np.stack([x_padded[:, i:i + y.shape[1], j:j + y.shape[2]]
                                  for j in range(kw)], 3) for i in range(kh)], 3)  # (B,P,Q,KH,KW,C)
    dw = np.einsum("bpqo,bpqijc->ijco", g, windows)
    dx_padded = np.einsum("bpqo,ijco->bpqijc", g, w.astype(np.float64))
    expected_dx = np.zeros_like(x_padded)
    for i in range(kh):
        for j in range(kw):
            expected_dx[:, i:i + y.shape[1], j:j + y.shape[2]] += dx_padded[:, :, :, i, j]
    expected_dx = expected_dx[:, top:top + height, left:left + width]
    dx, dw_got = vjp(jnp.asarray(g))
    np.testing.assert_allclose(dw_got, dw, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dx, expected_dx, atol=1e-4, rtol=1e-4)


def test_results_are_bitwise_repeatable():
    x, w = random(3, (128, 14, 14, 6), (5, 5, 6, 16))
    grad = jax.jit(jax.grad(lambda w: jnp.sum(conv_cpu.conv2d(x, w) ** 2)))
    first = np.asarray(grad(w))
    for _ in range(5):
        np.testing.assert_array_equal(grad(w), first)


def test_vmap_over_members_equals_each_member():
    x, w = random(4, (3, 8, 12, 12, 3), (3, 5, 5, 3, 6))
    stacked = jax.vmap(conv_cpu.conv2d)(x, w)
    for m in range(3):
        np.testing.assert_array_equal(stacked[m], conv_cpu.conv2d(x[m], w[m]))


@pytest.mark.parametrize("x_shape,w_shape", [((128, 32, 32, 3), (5, 5, 3, 6)),  # LeNet-5's conv1
                                             ((128, 14, 14, 6), (5, 5, 6, 16))])  # and conv2
def test_vmapped_kernels_equal_vmapped_xla(x_shape, w_shape):
    """A population of 3 members, each with its own images and weights: one FFI call per
    convolution takes all of them (forward, input and weight gradients), with the values of
    `jax.vmap` of XLA's convolution and the bits of each member's own calls."""
    members = 3
    x, w = random(11, (members, *x_shape), (members, *w_shape))
    cotangent, = random(12, (members, *xla_conv(x[0], w[0], "VALID").shape))
    vmapped = jax.jit(jax.vmap(conv_cpu.conv2d))

    def forward_and_gradients(x, w):
        y, vjp = jax.vjp(jax.vmap(conv_cpu.conv2d), x, w)
        return y, *vjp(cotangent)

    assert kernel_calls(forward_and_gradients, x, w) == 3  # forward, input and weight gradients
    result = value_and_vjp(lambda x, w, _: vmapped(x, w), x, w, None, cotangent)
    expected = value_and_vjp(jax.vmap(lambda x, w, _: xla_conv(x, w, "VALID"), (0, 0, None)), x, w,
                             None, cotangent)
    for name, got, want in zip(("y", "dx", "dw"), result, expected, strict=True):
        for m in range(members):  # each member within its own largest value
            np.testing.assert_allclose(got[m], want[m], atol=2e-6 * float(jnp.abs(want[m]).max()),
                                       rtol=0, err_msg=f"{name} of member {m}")
    for m in range(members):
        alone = value_and_vjp(lambda x, w, _: conv_cpu.conv2d(x, w), x[m], w[m], None,
                              cotangent[m])
        for name, got, want in zip(("y", "dx", "dw"), result, alone, strict=True):
            np.testing.assert_array_equal(got[m], want, err_msg=f"{name} of member {m}")


def test_vmapped_kernels_broadcast_shared_images_and_nest():
    """Images shared by the members (in_axes None) and two nested vmaps (4 = 2 x 2 members)."""
    x, w = random(13, (4, 16, 14, 14, 6), (4, 5, 5, 6, 16))
    shared = jax.jit(jax.vmap(conv_cpu.conv2d, (None, 0)))(x[0], w)
    assert_close(shared, jax.vmap(lambda w: xla_conv(x[0], w, "VALID"))(w))
    nested = jax.jit(jax.vmap(jax.vmap(conv_cpu.conv2d)))(x.reshape(2, 2, *x.shape[1:]),
                                                                w.reshape(2, 2, *w.shape[1:]))
    np.testing.assert_array_equal(nested.reshape(4, *nested.shape[2:]),
                                  jax.jit(jax.vmap(conv_cpu.conv2d))(x, w))


def test_only_eligible_convolutions_use_the_kernels():
    x, w = random(5, (2, 16, 16, 3), (3, 3, 3, 8))
    assert kernel_calls(lambda x, w: kernel_conv(x, w, "VALID"), x, w) == 1
    assert kernel_calls(lambda x, w: kernel_conv(x, w, ((1, 1), (1, 1))), x, w) == 1
    assert kernel_calls(lambda x, w: kernel_conv(x, w, "SAME"), x, w) == 1
    assert kernel_calls(lambda x, w: kernel_conv(x, w, ((-1, 0), (0, 0))), x, w) == 0  # cropping
    beyond = ((3, 0), (0, 4))  # more than the kernels' own k - 1: the rest is padded before
    assert kernel_calls(lambda x, w: kernel_conv(x, w, beyond), x, w) == 1
    assert_close(value_and_vjp(kernel_conv, x, w, beyond, jnp.ones((2, 17, 18, 8))),
                 value_and_vjp(xla_conv, x, w, beyond, jnp.ones((2, 17, 18, 8))))
    assert_close(jax.jit(lambda x, w: kernel_conv(x, w, "SAME"))(x, w), xla_conv(x, w, "SAME"))
    with xla_only():
        assert kernel_calls(lambda x, w: kernel_conv(x, w, "VALID"), x, w) == 0
    assert kernel_calls(lambda x, w: conv_cpu.conv_general_dilated(
        x, w, (2, 2), "VALID", dimension_numbers=NHWC), x, w) == 0
    wide, = random(6, (3, 3, 3, conv_cpu.MAX_CHANNELS + 1))
    assert kernel_calls(lambda x, w: kernel_conv(x, w, "VALID"), x, wide) == 0
    assert kernel_calls(lambda x, w: kernel_conv(x.astype(jnp.float16), w.astype(jnp.float16),
                                                 "VALID"), x, w) == 0


def test_interception_routes_only_nn_conv_calls_inside_the_context():
    """nn.Conv layers use the kernels inside cpu_convolutions() only, other interceptors still see
    their calls, and a strided layer stays on XLA."""
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), padding=1, name="padded")(x)
            x = nn.Conv(4, (3, 3), strides=2, name="strided")(x)
            return nn.Conv(4, (1, 1), name="pointwise")(x)

    x, = random(8, (2, 12, 12, 3))
    variables = Net().init(jax.random.key(0), x)
    seen = []

    def record(next_fun, args, kwargs, context):
        seen.append(context.module.name)
        return next_fun(*args, **kwargs)

    def apply(x, kernels):
        with cpu_convolutions() if kernels else contextlib.nullcontext(), nn.intercept_methods(record):
            return Net().apply(variables, x)

    assert kernel_calls(lambda x: apply(x, True), x) == 2
    assert seen == [None, "padded", "strided", "pointwise"]
    assert kernel_calls(lambda x: apply(x, False), x) == 0
    assert kernel_calls(cpu_convolutions()(lambda x: Net().apply(variables, x)), x) == 2  # decorator
    assert_close(jax.jit(lambda x: apply(x, True))(x), apply(x, False))


def population_gradients(model, x, labels, kernels: bool):
    """Jitted members -> per member (vmapped) loss and its gradients w.r.t. params and x."""
    def loss(params, batch_stats, x):
        with cpu_convolutions() if kernels else contextlib.nullcontext():
            logits = model.apply({"params": params, **batch_stats}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def member(variables):
        stats = {k: v for k, v in variables.items() if k != "params"}
        return jax.value_and_grad(loss, argnums=(0, 2))(variables["params"], stats, x)

    return jax.jit(jax.vmap(member))


@pytest.mark.parametrize("name,width,classes,eligible,members", [
    pytest.param("lenet5", 1.0, 43, 2, 1, marks=pytest.mark.slow),  # a chunk of one member, vmapped
    ("lenet5", 1.0, 43, 2, 2),  # two members: each kernel call takes both
    pytest.param("squeezenet", 1 / 32, 10, 26, 2,  # every layer fits (at most 16 channels)
                 marks=pytest.mark.slow),
    ("squeezenet", 0.25, 43, 6, 1),  # conv1, fire1, fire2's expands; the wider layers on XLA
])
def test_vmapped_models_with_kernels_equal_xla(name, width, classes, eligible, members):
    """Loss, parameter and input gradients of a vmapped population with and without kernels."""
    model = get_model(name, classes, width)
    population = jax.vmap(lambda k: init_variables(model, k))(jax.random.split(jax.random.key(1),
                                                                                members))
    x, = random(9, (8, 32, 32, 3))
    labels = jnp.arange(8) % classes
    with_kernels = population_gradients(model, x, labels, True)
    hlo = with_kernels.lower(population).compile().as_text()  # the optimised HLO: calls inlined
    # Per eligible layer, for all members at once: forward, input gradient (forward kernel),
    # weight gradient.
    assert hlo.count('custom_call_target="CompaxConvForward"') == 2 * eligible
    assert hlo.count('custom_call_target="CompaxConvWeightGradient"') == eligible
    assert_close(with_kernels(population), population_gradients(model, x, labels, False)(population),
                 relative=1e-5)


def test_saliency_and_grad_cam_with_kernels_equal_xla():
    model = get_model("lenet5", 43)
    float32 = Compressed(init_variables(model, jax.random.key(2)), None)
    x, = random(10, (40, 32, 32, 3))
    targets = jnp.arange(40) % 43

    def maps(analysis):
        return jax.jit(lambda c: analysis(model, c, x, targets, 16))

    # saliency: conv1, conv2 and both input gradients; Grad-CAM: the forward pass (dy/d conv2).
    for analysis, calls in ((saliency_maps, 4), (grad_cam, 2)):
        assert kernel_calls(lambda c, a=analysis: a(model, c, x, targets, 16), float32) == calls
        with xla_only():
            reference = maps(analysis)(float32)
        np.testing.assert_allclose(maps(analysis)(float32), reference, atol=1e-5, rtol=0)


def test_activation_quantized_variants_keep_xla_convolutions():
    """Their jaxpr interpreter places quantization points at the conv primitive."""
    def variant(activation_bits):
        config = types.SimpleNamespace(activation_bits=activation_bits)
        return types.SimpleNamespace(qstate=types.SimpleNamespace(config=config))

    assert isinstance(cpu_convolutions_for(variant(8)), contextlib.nullcontext)
    assert not isinstance(cpu_convolutions_for(variant(None)), contextlib.nullcontext)  # int8 weights
    assert not isinstance(cpu_convolutions_for(Compressed({}, None)), contextlib.nullcontext)


def test_models_do_not_import_the_kernels():
    source = "\n".join(path.read_text() for path in
                       pathlib.Path(__file__).parents[1].joinpath("compax/models").glob("*.py"))
    assert "kernels" not in source.replace("kernel_init", "").replace("kernels use", "")
    script = ("import sys\nimport compax.models\n"
              "assert not [m for m in sys.modules if m.startswith('compax.kernels')], sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_lenet_train_step_equals_xla():
    """One LeNet-5 gradient, with the kernels (conv1, conv2) and with XLA's convolution."""
    model = get_model("lenet5", 43)
    x, = random(7, (32, 32, 32, 3))
    labels = jnp.arange(32) % 43
    params = model.init(jax.random.key(0), x, train=False)["params"]

    def loss(p, kernels):
        with cpu_convolutions() if kernels else contextlib.nullcontext():
            logits = model.apply({"params": p}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    with_kernels = jax.jit(jax.grad(lambda p: loss(p, True)))(params)
    with_xla = jax.jit(jax.grad(lambda p: loss(p, False)))(params)
    hlo = jax.jit(jax.grad(lambda p: loss(p, True))).lower(params).as_text()
    assert hlo.count("CompaxConvForward") == 3  # conv1, conv2 and conv2's input gradient
    assert_close(with_kernels, with_xla)


def test_without_a_compiler_xla_convolutions_are_used(tmp_path):
    script = ("import flax.linen as nn, jax, jax.numpy as jnp\n"
              "from compax.kernels import conv_cpu, cpu_convolutions\n"
              "assert conv_cpu.load() is False\n"
              "x = jnp.ones((1, 8, 8, 3))\n"
              "conv = nn.Conv(4, (3, 3), kernel_init=nn.initializers.ones, padding='VALID')\n"
              "variables = conv.init(jax.random.key(0), x)\n"
              "with cpu_convolutions():\n"
              "    y = conv.apply(variables, x)\n"
              "assert float(y[0, 0, 0, 0]) == 27.0\n")
    env = {"CXX": str(tmp_path / "no-such-compiler"), "COMPAX_CACHE_DIR": str(tmp_path),
           "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "XLA's convolution is used" in result.stderr


# oneDNN for the wide and strided layers (compax.kernels.conv_onednn).

requires_onednn = pytest.mark.skipif(
    not conv_onednn.load(), reason="oneDNN is not installed (pip install onednn-cpu-gomp==2023.2.0 "
                                   "onednn-devel-cpu-gomp==2023.2.0): the wide layers stay on XLA")


def onednn_calls(fn, *args) -> int:
    """How many oneDNN calls the jitted fn(*args) makes."""
    return jax.jit(fn).lower(*args).as_text().count("CompaxOneDnn")


def strided_xla_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def resolved_pads(x, w, strides, padding):
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
    return tuple(tuple(pair) for pair in padding)


# Layers of ResNet-18 and SqueezeNet at width 1.0 (fewer images): ResNet's 3x3 stem, a 3x3 stride-2
# layer and its 1x1 stride-2 shortcut, a deep 3x3 layer; SqueezeNet's 3x3 expand and classifier;
# odd sizes with SAME and uneven padding at strides (2, 2) and (2, 1).
ONEDNN_CASES = [((2, 32, 32, 3), (3, 3, 3, 64), (1, 1), ((1, 1), (1, 1))),
                ((2, 32, 32, 64), (3, 3, 64, 128), (2, 2), ((1, 1), (1, 1))),
                ((2, 32, 32, 64), (1, 1, 64, 128), (2, 2), "VALID"),
                ((2, 8, 8, 256), (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1))),
                ((4, 8, 8, 32), (3, 3, 32, 128), (1, 1), ((1, 1), (1, 1))),
                ((4, 4, 4, 512), (1, 1, 512, 10), (1, 1), "VALID"),
                ((3, 9, 11, 5), (3, 3, 5, 24), (2, 2), "SAME"),
                ((3, 10, 7, 20), (5, 3, 20, 17), (2, 1), ((2, 0), (1, 3)))]


@requires_onednn
@pytest.mark.parametrize("x_shape,w_shape,strides,padding", ONEDNN_CASES)
def test_onednn_forward_and_gradients_equal_xla(x_shape, w_shape, strides, padding):
    x, w = random(20, x_shape, w_shape)
    cotangent, = random(21, strided_xla_conv(x, w, strides, padding).shape)
    pads = resolved_pads(x, w, strides, padding)
    expected = value_and_vjp(lambda x, w, _: strided_xla_conv(x, w, strides, padding), x, w, None,
                             cotangent)
    result = value_and_vjp(lambda x, w, _: conv_onednn.conv2d(x, w, strides, pads), x, w, None,
                           cotangent)
    for name, got, want in zip(("y", "dx", "dw"), result, expected, strict=True):
        assert got.shape == want.shape, name  # sums of up to 2304 products: rounding ~1e-6
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0,
                                   err_msg=name)


@requires_onednn
def test_onednn_under_vmap_equals_each_member():
    """3 members with their own images and kernels (forward, input and weight gradients in one
    call each), bitwise their own calls; images shared by the members (in_axes None)."""
    strides, pads = (2, 2), ((1, 1), (1, 1))
    x, w = random(22, (3, 6, 16, 16, 32), (3, 3, 3, 32, 48))
    cotangent, = random(23, (3, 6, 8, 8, 48))
    conv = functools.partial(conv_onednn.conv2d, strides=strides, pads=pads)

    def forward_and_gradients(x, w, cotangent):
        y, vjp = jax.vjp(conv, x, w)
        return y, *vjp(cotangent)

    assert onednn_calls(jax.vmap(forward_and_gradients), x, w, cotangent) == 3
    stacked = jax.jit(jax.vmap(forward_and_gradients))(x, w, cotangent)
    for m in range(3):
        alone = jax.jit(forward_and_gradients)(x[m], w[m], cotangent[m])
        for name, got, want in zip(("y", "dx", "dw"), stacked, alone, strict=True):
            np.testing.assert_array_equal(got[m], want, err_msg=f"{name} of member {m}")
    shared = jax.jit(jax.vmap(conv, (None, 0)))(x[0], w)
    assert_close(shared, jax.vmap(lambda w: strided_xla_conv(x[0], w, strides, pads))(w))


@requires_onednn
def test_routing_between_direct_kernels_onednn_and_xla():
    """Stride-1 layers of at most 16 channels keep the direct kernels, other eligible layers go to
    oneDNN unless the kernel dwarfs the images (conv_onednn.wins), the rest to XLA."""
    def calls(x_shape, w_shape, strides=(1, 1), padding="SAME", dtype=jnp.float32):
        fn = jax.jit(lambda x, w: conv_cpu.conv_general_dilated(x, w, strides, padding,
                                                                dimension_numbers=NHWC))
        text = fn.lower(jax.ShapeDtypeStruct(x_shape, dtype),
                        jax.ShapeDtypeStruct(w_shape, dtype)).as_text()
        return text.count("CompaxConvForward"), text.count("CompaxOneDnn")

    assert calls((2, 16, 16, 16), (3, 3, 16, 16)) == (1, 0)  # direct kernels
    assert calls((2, 16, 16, 16), (3, 3, 16, 32)) == (0, 1)  # 32 output channels
    assert calls((2, 16, 16, 8), (3, 3, 8, 8), (2, 2)) == (0, 1)  # strided
    assert calls((2, 4, 4, 512), (3, 3, 512, 8)) == (0, 0)  # 4608 taps > 4 x 32 output pixels
    assert calls((2, 16, 16, 32), (3, 3, 32, 32), padding=((-1, 0), (0, 0))) == (0, 0)  # cropping
    assert calls((2, 16, 16, 32), (3, 3, 32, 32), dtype=jnp.float16) == (0, 0)
    conv_onednn.enable(False)
    try:
        assert calls((2, 16, 16, 16), (3, 3, 16, 32)) == (0, 0)
        assert calls((2, 16, 16, 16), (3, 3, 16, 16)) == (1, 0)  # the direct kernels stay on
    finally:
        conv_onednn.enable(True)
    with xla_only():
        assert calls((2, 16, 16, 16), (3, 3, 16, 32)) == (0, 0)


class ResidualNet(nn.Module):
    """A ResNet-18-like stem, strided block with its 1x1 shortcut, and a SqueezeNet-like fire."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), padding=1, name="stem")(x))
        y = nn.relu(nn.Conv(64, (3, 3), strides=2, padding=1, name="strided")(x))
        y = nn.Conv(64, (3, 3), padding=1, name="conv2")(y)
        x = nn.relu(y + nn.Conv(64, (1, 1), strides=2, name="shortcut")(x))
        s = nn.relu(nn.Conv(16, (1, 1), name="squeeze")(x))  # 64 in: oneDNN
        x = jnp.concatenate([nn.Conv(32, (1, 1), name="expand1x1")(s),
                             nn.Conv(32, (3, 3), padding=1, name="expand3x3")(s)], -1)
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@requires_onednn
def test_onednn_in_a_flax_models_gradient_equals_xla():
    """jax.grad of a model's loss w.r.t. parameters and images, within cpu_convolutions()."""
    x, = random(25, (8, 16, 16, 3))
    labels = jnp.arange(8) % 10
    params = ResidualNet().init(jax.random.key(3), x)["params"]

    def loss(params, x):
        with cpu_convolutions():
            logits = ResidualNet().apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    hlo = grad.lower(params, x).compile().as_text()
    # 7 layers (every one has more than 16 channels or a stride), each forward, weight and input
    # gradient (the stem's too: the gradient w.r.t. the images is asked for).
    for target in ("Forward", "WeightGradient", "InputGradient"):
        assert hlo.count(f'custom_call_target="CompaxOneDnn{target}"') == 7, target
    with_onednn = grad(params, x)
    with xla_only():
        with_xla = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    assert_close(with_onednn, with_xla, relative=1e-5)


def test_without_onednn_xla_convolutions_are_used_with_one_warning(monkeypatch, caplog):
    """The loader finding no oneDNN: one warning, XLA's convolution and its values."""
    monkeypatch.setattr(conv_onednn, "_installed_file", lambda distribution, path: None)
    monkeypatch.setattr(conv_onednn, "load", functools.cache(conv_onednn.load.__wrapped__))
    x, w = random(26, (2, 16, 16, 16), (3, 3, 16, 32))

    def conv(x, w):
        return conv_cpu.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=NHWC)

    with caplog.at_level("WARNING"):
        assert onednn_calls(conv, x, w) == 0
        assert onednn_calls(lambda x, w: conv(x, w) + 1, x, w) == 0
    assert sum("oneDNN is not installed" in r.getMessage() for r in caplog.records) == 1
    np.testing.assert_array_equal(jax.jit(conv)(x, w), strided_xla_conv(x, w, (2, 2), "SAME"))
