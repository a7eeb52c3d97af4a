"""The study's models as pure flax modules, NHWC, registered by name.

A new model is one file and one entry in `MODELS`: a flax module taking `num_classes` and `width`
(the multiplier of every hidden layer's channels or units; the classifier keeps `num_classes`
outputs). Optional class attributes: `cpu_size` (its CPU-sized setting; default full width, 60
epochs, patience 10). Only a model that supports the layer ablation of Zee et al. (the `ablate`
compression step) also takes `drop_last_block` (the model without its last block of feature
layers, the head taking the previous block's output) and names `head_layers` (the layers after
that block, which `ablate` re-initialises); `ablate` refuses any other model before a run starts,
so a model without blocks (an MLP) simply leaves both out. Every model is called as
`model.apply(variables, images, train=...)`; models with BatchNorm keep their running statistics in
the `batch_stats` collection, and SqueezeNet needs a `dropout` PRNG stream when `train=True`.
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


def model_class(name: str) -> type[nn.Module]:
    """The flax class of the registered model `name` (a `functools.partial` registration, such as
    `squeezenet_torchvision`, shares its class's `cpu_size` and `head_layers`)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    factory = MODELS[name]
    return factory.func if isinstance(factory, functools.partial) else factory


def cpu_size(name: str) -> tuple[float, int, int]:
    """(width, max_epochs, patience) of the registered model `name` in the CPU-sized setting: its
    class's `cpu_size`, or full width, at most 60 epochs and patience 10 where it names none."""
    return getattr(model_class(name), "cpu_size", (1.0, 60, 10))


def init_variables(model: nn.Module, key: jax.Array) -> dict:
    """Initial variables (`params`, and `batch_stats` where the model has BatchNorm)."""
    return model.init(key, jnp.zeros((1, *INPUT_SHAPE), jnp.float32), train=False)


def count_params(params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
