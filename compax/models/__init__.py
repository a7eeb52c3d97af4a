"""The study's models as pure flax modules, NHWC, registered by name.

Every model is called as `model.apply(variables, images, train=...)`; models with BatchNorm keep
their running statistics in the `batch_stats` collection, and SqueezeNet needs a `dropout` PRNG
stream when `train=True`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compax.errors import UserError
from compax.models.lenet import LeNet5
from compax.models.resnet import ResNet18
from compax.models.squeezenet import SqueezeNet
from compax.models.vgg import VGG6

MODELS = {"lenet5": LeNet5, "squeezenet": SqueezeNet, "resnet18": ResNet18, "vgg6": VGG6,
          "squeezenet_torchvision": functools.partial(SqueezeNet, classifier_relu=True)}
INPUT_SHAPE = (32, 32, 3)


def get_model(name: str, num_classes: int, width: float = 1.0) -> nn.Module:
    """The registered model `name` with `num_classes` outputs and channel width multiplier `width`."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    if not width > 0:
        raise UserError(f"model width must be > 0, got {width}: set --config.model_width")
    return MODELS[name](num_classes=num_classes, width=width)


def init_variables(model: nn.Module, key: jax.Array) -> dict:
    """Initial variables (`params`, and `batch_stats` where the model has BatchNorm)."""
    return model.init(key, jnp.zeros((1, *INPUT_SHAPE), jnp.float32), train=False)


def count_params(params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
