"""SqueezeNet 1.1 (Iandola et al. 2016; torchvision's `squeezenet1_1`) adapted to 32x32 inputs.

On 224x224 images SqueezeNet starts with a stride-2 3x3 convolution and pools three times. For
32x32 inputs the first convolution has stride 1 and padding 1, and the three 3x3/2 max pools
become 2x2/2 pools, so the feature maps are 32 -> 16 -> 8 -> 4. The fire modules and the
classifier (dropout 0.5, 1x1 conv to the classes, global average pool) are those of torchvision
but for one change: no ReLU on the class maps. About 745k parameters with 43 classes, 728k with 10.

torchvision's classifier rectifies the class maps before pooling, so a class whose 1x1 conv output
turns negative on every position of every image gets logit 0 and no gradient, for good (the ReLU
the SqueezeNet authors call unneeded, forresti/SqueezeNet issue 10). Trained as the study trains
(Adam 1e-3, batch 128), that happens to many classes within the first epochs, in PyTorch as here:
on GTSRB at width 0.25 after 4 epochs 20 (PyTorch) and 24 (compax) of the 43 class outputs are
constant and validation accuracy stalls near 65%; at full width 27 of 43 after 9 epochs; Adam 3e-4
still leaves 15. Without the ReLU none dies (RESULTS.md, session 10). `classifier_relu=True`,
registered as `squeezenet_torchvision`, is torchvision's head exactly.

Initialisation is torchvision's for SqueezeNet, not PyTorch's layer default: convolutions
`kaiming_uniform_` (a=0: U(-sqrt(6/fan_in), sqrt(6/fan_in))), the classifier N(0, 0.01), biases
zero. With the layer default (variance 1/(3 fan_in), six times smaller) the signal fades through
the 18 ReLU layers and the network never leaves the majority class.
"""

import functools
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from compax.models.layers import max_pool_2x2, scaled

Conv = functools.partial(nn.Conv, kernel_init=nn.initializers.he_uniform())

# (squeeze, expand) channels of the eight fire modules; a 2x2 max pool follows fires 2 and 4.
FIRES = ((16, 64), (16, 64), (32, 128), (32, 128), (48, 192), (48, 192), (64, 256), (64, 256))
POOL_AFTER = (1, 3)


class Fire(nn.Module):
    """Fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated, each followed by ReLU."""

    squeeze: int
    expand: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = nn.relu(Conv(self.squeeze, (1, 1), name="squeeze")(x))
        e1 = nn.relu(Conv(self.expand, (1, 1), name="expand1x1")(s))
        e3 = nn.relu(Conv(self.expand, (3, 3), padding=1, name="expand3x3")(s))
        return jnp.concatenate([e1, e3], axis=-1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 for 32x32 NHWC images; `width` scales every convolution."""

    # The CPU-sized setting (`compax.config.study_config`): (width, max_epochs, patience).
    cpu_size: ClassVar[tuple[float, int, int]] = (0.25, 15, 5)
    # The layers after the last conv block, which layer ablation re-initialises and trains.
    head_layers: ClassVar[tuple[str, ...]] = ("classifier",)

    num_classes: int
    width: float = 1.0
    dropout_rate: float = 0.5
    drop_last_block: bool = False  # layer ablation (Zee et al.): no fire8, the classifier takes fire7's map
    classifier_relu: bool = False  # True: torchvision's ReLU on the class maps (see the module doc)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.relu(Conv(scaled(64, self.width), (3, 3), padding=1, name="conv1")(x))
        x = max_pool_2x2(x)
        for i, (squeeze, expand) in enumerate(FIRES[:-1] if self.drop_last_block else FIRES):
            x = Fire(scaled(squeeze, self.width), scaled(expand, self.width), name=f"fire{i + 1}")(x)
            if i in POOL_AFTER:
                x = max_pool_2x2(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01),
                 name="classifier")(x)
        if self.classifier_relu:
            x = nn.relu(x)
        return jnp.mean(x, axis=(1, 2))
