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
    """BatchNorm with PyTorch's defaults; batch statistics while training (`TrainingBatchNorm`),
    running ones otherwise (flax's `nn.BatchNorm`). Both have the same variables."""
    if train:
        return TrainingBatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, name=name)
    return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, name=name)


class TrainingBatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` in training mode over the last axis (Ioffe & Szegedy 2015): the same
    variables, the same values, the same update of the running averages
    (`ra = momentum ra + (1 - momentum) batch`, the batch variance biased, as flax's), and a
    gradient written by hand (`normalize_batch`) instead of XLA's autodiff of flax's, which reads
    and writes the activations more often: 1.6-2.2x faster forward and backward on a ResNet-18's
    maps on the CPU. A subclass, so code that looks for BatchNorms (folding, shrinking) finds it.
    """

    @nn.compact
    def __call__(self, x, use_running_average=None, *, mask=None):
        if use_running_average or mask is not None or self.axis not in (-1, x.ndim - 1) \
                or self.axis_name is not None or not (self.use_scale and self.use_bias):
            raise ValueError("TrainingBatchNorm normalises the last axis with batch statistics, a "
                             "scale and a bias: use nn.BatchNorm for anything else")
        features = (x.shape[-1],)
        running_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                     features)
        running_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                                    features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        y, mean, var = normalize_batch(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return y


def _batch_moments(x):
    """Per channel (last axis) mean and biased variance, E[x^2] - E[x]^2 floored at 0 (flax's
    `use_fast_variance`): one pass over x."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(x, scale, bias, epsilon):
    """Batch normalisation of x over every axis but the last, and the batch's mean and variance:

        y = (x - mean) * rsqrt(var + epsilon) * scale + bias

    The gradient, with N the elements per channel, r = rsqrt(var + epsilon), x^ = (x - mean) r
    and the cotangents g (of y), g_mean, g_var (of the moments):

        d bias  = sum g                d scale = sum g x^ = r (sum g x - mean sum g)
        d x     = scale r (g - sum g / N - x^ d scale / N) + g_mean / N + 2 g_var (x - mean) / N

    two passes over the maps: one reduction (sum g, sum g x) and one elementwise.
    """
    y, mean, var, _ = _normalize_forward_values(x, scale, bias, epsilon)
    return y, mean, var


def _normalize_forward_values(x, scale, bias, epsilon):
    mean, var = _batch_moments(x)
    r = jax.lax.rsqrt(var + epsilon)
    return (x - mean) * (r * scale) + bias, mean, var, r


def _normalize_forward(x, scale, bias, epsilon):
    y, mean, var, r = _normalize_forward_values(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, r)


def _normalize_backward(epsilon, residuals, cotangents):
    del epsilon
    x, scale, mean, r = residuals
    g, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    sum_g = jnp.sum(g, axes)
    d_scale = r * (jnp.sum(g * x, axes) - mean * sum_g)
    a = scale * r
    # d x = a g + (2 g_var / N - a r d_scale / N) (x - mean) + (g_mean - a sum g) / N
    dx = a * g + (2 * g_var - a * r * d_scale) / n * (x - mean) + (g_mean - a * sum_g) / n
    return dx, d_scale, sum_g


normalize_batch.defvjp(_normalize_forward, _normalize_backward)


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
