"""Layer defaults shared by the study's models.

The study trained PyTorch models, so kernels use PyTorch's default initialisation
(`kaiming_uniform_(a=sqrt(5))`), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is
`variance_scaling(1/3, "fan_in", "uniform")`. Biases start at zero. BatchNorm uses PyTorch's
defaults: momentum 0.1 (flax's `momentum` is the complement, 0.9) and epsilon 1e-5.
"""

import functools

import flax.linen as nn
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
    gradient is a compare-and-broadcast instead of XLA's select-and-scatter, which is slow on CPU
    (a LeNet-5 training step spends ~15% of its time there). Ties share the gradient equally.
    """
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
