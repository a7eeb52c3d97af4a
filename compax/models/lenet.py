"""LeNet-5 as used by Schwaiger et al. (2022) on 32x32 RGB images.

conv5x5(6) - ReLU - maxpool2 - conv5x5(16) - ReLU - maxpool2 - FC120 - ReLU - FC84 - ReLU - FC(classes).
64,811 parameters with 43 classes, 62,006 with 10 (LeNet-5 of LeCun et al. 1998 with ReLU and max
pooling, as in the PyTorch tutorials the study follows). The feature map is flattened in channel-major
(C, H, W) order, PyTorch's order, so that weights port one-to-one to and from `torch.nn.Linear`.
"""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from compax.models.layers import Conv, Dense, max_pool_2x2, scaled


class LeNet5(nn.Module):
    """LeNet-5 classifier for NHWC 32x32 images; `width` scales every layer."""

    # The CPU-sized setting (`compax.config.study_config`): (width, max_epochs, patience).
    cpu_size: ClassVar[tuple[float, int, int]] = (1.0, 60, 10)
    # The layers after the last conv block, which layer ablation re-initialises and trains.
    head_layers: ClassVar[tuple[str, ...]] = ("fc1", "fc2", "fc3")

    num_classes: int
    width: float = 1.0
    drop_last_block: bool = False  # layer ablation (Zee et al.): no conv2, fc1 takes the pooled conv1 map

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # No dropout or BatchNorm.
        w = self.width
        x = nn.relu(Conv(scaled(6, w), (5, 5), padding="VALID", name="conv1")(x))
        x = max_pool_2x2(x)
        if not self.drop_last_block:
            x = nn.relu(Conv(scaled(16, w), (5, 5), padding="VALID", name="conv2")(x))
            x = max_pool_2x2(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = nn.relu(Dense(scaled(120, w), name="fc1")(x))
        x = nn.relu(Dense(scaled(84, w), name="fc2")(x))
        return Dense(self.num_classes, name="fc3")(x)
