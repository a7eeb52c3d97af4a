"""Models: output shapes, parameter counts against the study's figures, BatchNorm, the registry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compax.errors import UserError
from compax.models import MODELS, count_params, get_model, init_variables
from compax.models.layers import max_pool_2x2


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


def test_width_multiplier_shrinks_models():
    for name in MODELS:
        assert param_count(name, 10, 0.25) < param_count(name, 10) / 4


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
