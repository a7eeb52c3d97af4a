"""VGG-6, the small VGG-style network of Zee, Lakshmana and Nwogu.

Six 3x3 convolutions (32, 32, 64, 64, 128, 128 channels) each with BatchNorm and ReLU, a 2x2 max
pool after every second one, then FC 2048 -> 1024 -> 512 -> classes with ReLU between. On 32x32
inputs the last feature map is 4x4x128 = 2048 values. About 2.9M parameters.
"""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from compax.models.layers import Conv, Dense, batch_norm, max_pool_2x2, scaled

CONV_CHANNELS = (32, 32, 64, 64, 128, 128)
HIDDEN = (1024, 512)


class VGG6(nn.Module):
    """VGG-6 for 32x32 NHWC images; `width` scales every convolution and hidden layer."""

    # The CPU-sized setting (`compax.config.study_config`): (width, max_epochs, patience).
    cpu_size: ClassVar[tuple[float, int, int]] = (0.25, 15, 5)
    # The layers after the last conv block, which layer ablation re-initialises and trains.
    head_layers: ClassVar[tuple[str, ...]] = ("fc1", "fc2", "fc3")

    num_classes: int
    width: float = 1.0
    drop_last_block: bool = False  # layer ablation (Zee et al.): no conv6 and its pool, fc1 takes 8x8 maps

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for i, channels in enumerate(CONV_CHANNELS[:-1] if self.drop_last_block else CONV_CHANNELS):
            x = Conv(scaled(channels, self.width), (3, 3), padding=1, use_bias=False,
                     name=f"conv{i + 1}")(x)
            x = nn.relu(batch_norm(train, f"bn{i + 1}")(x))
            if i % 2 == 1:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        for i, hidden in enumerate(HIDDEN):
            x = nn.relu(Dense(scaled(hidden, self.width), name=f"fc{i + 1}")(x))
        return Dense(self.num_classes, name=f"fc{len(HIDDEN) + 1}")(x)
