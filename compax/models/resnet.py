"""ResNet-18 (He et al. 2016) with the CIFAR-style stem used for 32x32 images.

A 3x3/1 convolution replaces the 7x7/2 convolution and max pool of the ImageNet stem; four
stages of two basic blocks with 64, 128, 256, 512 channels (strides 1, 2, 2, 2), 1x1 projection
shortcuts where the shape changes, global average pooling and a linear classifier. Every
convolution is followed by BatchNorm and has no bias. About 11.2M parameters.
"""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from compax.models.layers import Conv, Dense, batch_norm, scaled

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: relu(bn(conv(relu(bn(conv x)))) + x)."""

    channels: int
    stride: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = Conv(self.channels, (3, 3), self.stride, padding=1, use_bias=False, name="conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = Conv(self.channels, (3, 3), padding=1, use_bias=False, name="conv2")(y)
        y = batch_norm(train, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = Conv(self.channels, (1, 1), self.stride, use_bias=False, name="shortcut_conv")(x)
            x = batch_norm(train, "shortcut_bn")(x)
        return nn.relu(y + x)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 NHWC images; `width` scales every convolution."""

    # The CPU-sized setting (`compax.config.study_config`): (width, max_epochs, patience).
    cpu_size: ClassVar[tuple[float, int, int]] = (0.125, 8, 4)
    # The layers after the last conv block, which layer ablation re-initialises and trains.
    head_layers: ClassVar[tuple[str, ...]] = ("fc",)

    num_classes: int
    width: float = 1.0
    drop_last_block: bool = False  # layer ablation (Zee et al.): no layer4_*, fc takes 256*width channels

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = Conv(scaled(64, self.width), (3, 3), padding=1, use_bias=False, name="conv1")(x)
        x = nn.relu(batch_norm(train, "bn1")(x))
        for stage, (channels, stride) in enumerate(STAGES[:-1] if self.drop_last_block else STAGES):
            for block in range(2):
                x = BasicBlock(scaled(channels, self.width), stride if block == 0 else 1,
                               name=f"layer{stage + 1}_{block}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return Dense(self.num_classes, name="fc")(x)
