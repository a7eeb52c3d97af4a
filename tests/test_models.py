"""Models: output shapes, parameter counts against the study's figures, BatchNorm, the registry."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compax.errors import UserError
from compax.models import MODELS, count_params, get_model, init_variables
from compax.models.layers import TrainingBatchNorm, batch_norm, max_pool_2x2
from torch_reference.models import TWINS, port_params, torch_model


def param_count(name, classes, width=1.0):
    model = get_model(name, classes, width)
    return count_params(jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"])


def test_lenet5_has_the_studys_parameter_counts():
    # Schwaiger et al.'s LeNet-5: 64,811 parameters with 43 outputs, 62,006 with 10.
    assert param_count("lenet5", 43) == 64_811
    assert param_count("lenet5", 10) == 62_006


@pytest.mark.parametrize("name, classes, expected", [
    ("squeezenet", 43, 750_000), ("squeezenet", 10, 750_000),
    ("resnet18", 10, 11_000_000), ("resnet18", 43, 11_000_000),
])
def test_large_models_are_within_ten_percent_of_the_studys_sizes(name, classes, expected):
    assert abs(param_count(name, classes) - expected) <= 0.1 * expected


def test_vgg6_matches_its_layer_formula():
    convs = [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
    conv = sum(9 * i * o + 2 * o for i, o in convs)  # no conv bias; BatchNorm scale and bias
    dense = 2048 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 10 + 10
    assert param_count("vgg6", 10) == conv + dense


def kernel_outputs(name, width):
    """{path: output channels} of every conv and dense kernel of the model at `width`."""
    model = get_model(name, 10, width)
    params = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"]
    return {jax.tree_util.keystr(path): leaf.shape[-1]
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if path[-1].key == "kernel"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_multiplier_narrows_every_hidden_layer(name):
    # What `width` promises for any model (one whose input layer dominates the parameter count
    # included): every kernel but the classifier's has fewer outputs at a quarter of the width,
    # the classifier keeps one output per class, and the model has fewer parameters.
    full, narrow = kernel_outputs(name, 1.0), kernel_outputs(name, 0.25)
    assert full.keys() == narrow.keys()
    outputs = [k for k in full if full[k] == 10 and narrow[k] == 10]
    assert outputs, "the classifier keeps one output per class"
    assert all(narrow[k] < full[k] for k in full if k not in outputs)
    assert param_count(name, 10, 0.25) < param_count(name, 10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shapes_and_train_mode(name):
    model = get_model(name, 7, width=0.25)
    variables = init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (3, 7) and bool(jnp.all(jnp.isfinite(logits)))
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(2)})
    assert out.shape == (3, 7)
    has_batchnorm = "batch_stats" in variables
    assert has_batchnorm == (name in ("resnet18", "vgg6"))
    if has_batchnorm:  # running statistics move towards the batch's
        before = jax.tree_util.tree_leaves(variables["batch_stats"])
        after = jax.tree_util.tree_leaves(updates["batch_stats"])
        assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_lenet5_kernels_use_pytorch_default_init_bounds():
    params = init_variables(get_model("lenet5", 43), jax.random.key(0))["params"]
    kernel = np.asarray(params["fc1"]["kernel"])  # fan_in 400: U(-1/20, 1/20)
    assert np.abs(kernel).max() <= 1 / 20 and np.abs(kernel).max() > 0.9 / 20
    assert abs(kernel.std() - (1 / 20) / np.sqrt(3)) < 0.002


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'alexnet'"):
        get_model("alexnet", 10)


def first_max_pool_gradient(x, upstream):
    """numpy reference of d(sum(maxpool2x2(x) * upstream)) / dx: each window's gradient goes to
    its first maximal element in row-major order (PyTorch's MaxPool2d)."""
    grad = np.zeros_like(x)
    b, h, w, c = x.shape
    for n, i, j, k in np.ndindex(b, h // 2, w // 2, c):
        window = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k]
        di, dj = np.unravel_index(np.argmax(window), (2, 2))  # argmax: first of tied maxima
        grad[n, 2 * i + di, 2 * j + dj, k] = upstream[n, i, j, k]
    return grad


@pytest.mark.parametrize("shape", [(2, 6, 6, 4), (1, 7, 5, 3)])
def test_max_pool_gradient_goes_to_the_first_of_tied_maxima(shape):
    # Integer inputs from {0, 1, 2} tie in most windows, as flat image regions do.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, shape).astype(np.float32)
    upstream = rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32)
    pooled, pullback = jax.vjp(max_pool_2x2, jnp.asarray(x))
    np.testing.assert_array_equal(pooled, nn.max_pool(jnp.asarray(x), (2, 2), (2, 2)))
    np.testing.assert_array_equal(pullback(jnp.asarray(upstream))[0],
                                  first_max_pool_gradient(x, upstream))


@pytest.mark.torch
def test_max_pool_gradient_equals_torch_max_pool2d():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (2, 8, 8, 6)).astype(np.float32)
    upstream = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)
    x_torch = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    pooled = torch.nn.functional.max_pool2d(x_torch, 2)
    (pooled * torch.tensor(upstream.transpose(0, 3, 1, 2))).sum().backward()
    grad = jax.grad(lambda a: jnp.sum(max_pool_2x2(a) * upstream))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad).transpose(0, 3, 1, 2), x_torch.grad.numpy())


def batch_norm_step(module, variables, x, upstream):
    """y, the updated running statistics, and the gradients (x, scale, bias) of a loss that also
    reads the updated statistics (so the moments' gradient paths are checked too)."""
    def loss(x, params):
        y, updated = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  mutable=["batch_stats"])
        stats = updated["batch_stats"]
        return jnp.sum(y * upstream) + jnp.sum(stats["mean"] * 3.0 - stats["var"] * 5.0), (y, stats)
    (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, variables["params"])
    return y, stats, grads


@pytest.mark.parametrize("shape", [(128, 32, 32, 8), (7, 5, 3, 64), (32, 84)])
def test_training_batch_norm_equals_flax_batch_norm(shape):
    """The hand-written gradient against XLA's autodiff of flax's BatchNorm, on a ResNet-18 x0.125
    map, odd sizes with 64 channels and a dense layer's output, from a non-trivial state."""
    keys = jax.random.split(jax.random.key(0), 6)
    x = 3.0 * jax.random.normal(keys[0], shape) + 1.5
    upstream = jax.random.normal(keys[1], shape)
    channels = shape[-1]
    variables = {"params": {"scale": 1 + 0.3 * jax.random.normal(keys[2], (channels,)),
                            "bias": jax.random.normal(keys[3], (channels,))},
                 "batch_stats": {"mean": jax.random.normal(keys[4], (channels,)),
                                 "var": jnp.exp(jax.random.normal(keys[5], (channels,)))}}
    ours = batch_norm_step(batch_norm(train=True), variables, x, upstream)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    theirs = batch_norm_step(flax_bn, variables, x, upstream)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(jnp.abs(want).max()))
    assert isinstance(batch_norm(train=True), nn.BatchNorm)  # folding and shrinking find it
    init = batch_norm(train=True).init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, flax_bn.init(jax.random.key(1), x))
    np.testing.assert_array_equal(init["batch_stats"]["var"], 1.0)  # not updated by init


def test_training_batch_norm_under_vmap_equals_each_member():
    x = jax.random.normal(jax.random.key(2), (3, 16, 6, 6, 5))
    variables = jax.vmap(lambda x: batch_norm(train=True).init(jax.random.key(0), x))(x)
    upstream = jax.random.normal(jax.random.key(3), x.shape[1:])
    stacked = jax.vmap(lambda v, x: batch_norm_step(batch_norm(train=True), v, x, upstream))(
        variables, x)
    for m in range(3):
        alone = batch_norm_step(batch_norm(train=True), jax.tree.map(lambda a, m=m: a[m], variables),
                                x[m], upstream)
        for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(alone), strict=True):
            np.testing.assert_allclose(got[m], want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


def test_training_batch_norm_refuses_what_it_does_not_do():
    x = jnp.ones((4, 3, 3, 2))
    with pytest.raises(ValueError, match="use nn.BatchNorm"):
        TrainingBatchNorm(use_running_average=False, axis=1).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="use nn.BatchNorm"):
        TrainingBatchNorm(use_running_average=False, use_bias=False).init(jax.random.key(0), x)


@pytest.mark.torch
def test_training_batch_norm_equals_torch():
    """Forward and gradients against PyTorch's training-mode batch_norm on a ResNet-18 map."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = (2 * rng.standard_normal((16, 8, 8, 32)) + 1).astype(np.float32)
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    scale = (1 + 0.2 * rng.standard_normal(32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
                 "batch_stats": {"mean": jnp.zeros(32), "var": jnp.ones(32)}}

    def loss(x, params):
        y, _ = batch_norm(train=True).apply({"params": params,
                                              "batch_stats": variables["batch_stats"]}, x,
                                             mutable=["batch_stats"])
        return jnp.sum(y * upstream), y
    (_, y), (dx, dparams) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        jnp.asarray(x), variables["params"])
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x.transpose(0, 3, 1, 2), scale, bias))
    ty = torch.nn.functional.batch_norm(tx, torch.zeros(32), torch.ones(32), tw, tb, training=True,
                                        momentum=0.1, eps=1e-5)
    (ty * torch.tensor(upstream.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), atol=2e-5, rtol=0)
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), atol=2e-5, rtol=0)
    np.testing.assert_allclose(dparams["scale"], tw.grad.numpy(), atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(dparams["bias"], tb.grad.numpy(), atol=2e-4, rtol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(TWINS))
@pytest.mark.parametrize("width", [0.25, 1.0])
def test_pytorch_twins_have_their_models_parameter_count(name, width):
    """The benchmarks' PyTorch twins are the same architectures: as many trainable parameters as
    compax's model (batch norm: scale and bias in both, its statistics as buffers / batch_stats)."""
    pytest.importorskip("torch")
    model = get_model(name, 43, width)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    twin = torch_model(name, width, 43)
    assert sum(p.numel() for p in twin.parameters()) == count_params(variables["params"])


@pytest.mark.torch
def test_porting_weights_of_another_width_or_model_is_refused():
    pytest.importorskip("torch")
    params = init_variables(get_model("lenet5", 10, 0.5), jax.random.key(0))["params"]
    with pytest.raises(UserError, match="does not fit the twin's"):
        port_params(torch_model("lenet5", 1.0, 10), params)
    twin = torch_model("lenet5", 0.5, 10)
    with pytest.raises(UserError, match="has no layer 'fc9'"):
        port_params(twin, {"fc9": params["fc1"]})
    with pytest.raises(UserError, match=r"params lack the twin's layers \['fc3'\]"):
        port_params(twin, {name: layer for name, layer in params.items() if name != "fc3"})
    with pytest.raises(UserError, match="no PyTorch twin of model 'alexnet'"):
        torch_model("alexnet", 1.0, 10)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["squeezenet", "squeezenet_torchvision"])
def test_squeezenet_heads_equal_their_pytorch_twins(name):
    """Both heads, with the same weights, against their PyTorch twins (torch_reference/models.py, the
    ones the benchmarks time and the PTQ tests quantize): the default's class maps are linear
    (logits can be negative), torchvision's are rectified before the pool."""
    torch = pytest.importorskip("torch")
    model = get_model(name, 10, 0.25)
    params = init_variables(model, jax.random.key(0))["params"]
    # Larger classifier weights than the N(0, 0.01) init, so that some class maps are negative.
    params["classifier"]["kernel"] = params["classifier"]["kernel"] * 100
    twin = torch_model(name, 0.25, 10).eval()
    port_params(twin, params)
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
    with torch.no_grad():
        want = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert (got < 0).any() == (name == "squeezenet")
