"""Layer defaults shared by the study's models.

The study trained PyTorch models, so kernels use PyTorch's default initialisation
(`kaiming_uniform_(a=sqrt(5))`), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is
`variance_scaling(1/3, "fan_in", "uniform")`. Biases start at zero. BatchNorm uses PyTorch's
defaults: momentum 0.1 (flax's `momentum` is the complement, 0.9) and epsilon 1e-5.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

Conv = functools.partial(nn.Conv, kernel_init=torch_default_kernel_init)
Dense = functools.partial(nn.Dense, kernel_init=torch_default_kernel_init)


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults; batch statistics while training, running ones otherwise."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def scaled(channels: int, width: float) -> int:
    """A channel count multiplied by the width multiplier, at least 1."""
    return max(1, round(channels * width))


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max pooling with stride 2 over NHWC maps, odd sizes floored like `torch.nn.MaxPool2d(2)`.

    Computed as a reshape and a max: the same values as `nn.max_pool(x, (2, 2), (2, 2))`, but its
    gradient is a compare-and-select instead of XLA's select-and-scatter, which is slow on CPU
    (a LeNet-5 training step spends ~15% of its time there). The gradient goes to the first
    maximum of each window in row-major order, as PyTorch's MaxPool2d routes it: windows with tied
    maxima are common in images with flat regions (GTSRB), and saliency maps must match the
    study's PyTorch ones there (jnp.max would share the gradient among the tied elements).
    """
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return _max_pool_2x2_even(x if (h, w) == x.shape[1:3] else x[:, :h, :w])


def _windows(x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def _max_pool_2x2_even(x: jnp.ndarray) -> jnp.ndarray:
    return _windows(x).max(axis=(2, 4))


def _max_pool_forward(x):
    pooled = _max_pool_2x2_even(x)
    return pooled, (x, pooled)


def _max_pool_backward(residuals, grad):
    """d pooled / d x: 1 at the first maximal element of each window (row-major), else 0."""
    x, pooled = residuals
    is_max = _windows(x) == pooled[:, :, None, :, None, :]
    top_left, top_right = is_max[:, :, 0, :, 0], is_max[:, :, 0, :, 1]
    bottom_left, bottom_right = is_max[:, :, 1, :, 0], is_max[:, :, 1, :, 1]
    top = top_left | top_right
    first = jnp.stack([jnp.stack([top_left, top_right & ~top_left], axis=3),
                       jnp.stack([bottom_left & ~top, bottom_right & ~(top | bottom_left)], axis=3)],
                      axis=2)
    return (jnp.where(first, grad[:, :, None, :, None, :], 0).reshape(x.shape),)


_max_pool_2x2_even.defvjp(_max_pool_forward, _max_pool_backward)
