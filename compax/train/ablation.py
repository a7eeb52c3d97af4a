"""Layer ablation (Zee, Lakshmana and Nwogu): drop the last conv block, freeze the rest, retrain the head.

The ablated model is the trained model built with `drop_last_block=True` (LeNet-5 without conv2 and
its pool, ResNet-18 without the stage layer4_*, SqueezeNet without fire8, VGG-6 without conv6 and its
pool). Its layers keep their names, so every layer before the dropped block (the body) takes the
trained weights unchanged and stays frozen, while the layers after it (the head, `HEAD_LAYERS`: the
dense layers, SqueezeNet's 1x1 classifier convolution) are initialised afresh and trained with Adam on
the softmax cross-entropy. The change in accuracy (and every other analysis of the variant) measures
how much the dropped block contributed beyond what the head can recover from the earlier features.

The head is trained with the whole model in evaluation mode: frozen BatchNorm layers normalise with
their running statistics, in training exactly as at test time, and keep them; SqueezeNet's dropout
(before its classifier) is off. The frozen layers get zero updates (`optax.multi_transform` with
`optax.set_to_zero`), so they keep their trained values exactly.

As a recipe step: `ablate(epochs=5)` (the recipe `ablated`). Each epoch's training loss (mean over
its steps) and validation loss per member go to TensorBoard event files in `log_dir` (the step's
`<workdir>/tensorboard/<variant>/ablate` in a run; `compax/train/scalars.py`).
"""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compax.compress.registry import Context, Step, Variant, register_step
from compax.data import Dataset
from compax.errors import UserError
from compax.models import MODELS, get_model, init_variables
from compax.population import loss_and_accuracy, make_predict, model_apply
from compax.train.early_stopping import update_early_stopping
from compax.train.population import (
    AUGMENT,
    DATA,
    DROPOUT,
    best_variables,
    init_population,
    member_keys,
    variables_of,
)
from compax.train.scalars import ScalarWriter
from compax.train.steps import epoch_order, make_train_step

# The layers after the dropped block: re-initialised and trained.
HEAD_LAYERS = {
    "lenet5": ("fc1", "fc2", "fc3"),
    "resnet18": ("fc",),
    "squeezenet": ("classifier",),
    "vgg6": ("fc1", "fc2", "fc3"),
}


def ablated_model(model_name: str, num_classes: int, width: float) -> nn.Module:
    """The registered model without its last conv block (`drop_last_block=True`)."""
    return get_model(model_name, num_classes, width).clone(drop_last_block=True)


def transfer_body(trained: dict, ablated: dict, head: tuple[str, ...]) -> dict:
    """`ablated` variables with every layer outside `head` taken from `trained`, in every collection.

    The layers of the body must exist in `trained` with the same shapes (leading member axis
    included); a mismatch is a UserError.
    """
    def layer(collection: str, name: str, initial):
        if name in head:
            return initial
        source = trained.get(collection, {}).get(name)
        shape = jax.tree.map(np.shape, initial)
        if source is None or jax.tree.structure(source) != jax.tree.structure(initial) or \
                jax.tree.map(np.shape, source) != shape:
            raise UserError(
                f"the trained {collection} have no layer {name!r} shaped {shape}: pass the variables of a"
                " population (leading member axis) of the same model, width and classes")
        return source

    return {collection: {name: layer(collection, name, initial) for name, initial in layers.items()}
            for collection, layers in ablated.items()}


class _EvalModeModel:
    """`model` as `make_train_step` calls it, always in evaluation mode and with nothing mutable."""

    def __init__(self, model: nn.Module):
        self.model = model

    def apply(self, variables, x, train, mutable, rngs):
        del train, mutable, rngs  # frozen BatchNorm statistics, no dropout (see the module doc)
        return self.model.apply(variables, x, train=False), {}


def ablate(model_name: str, num_classes: int, width: float, variables: dict, dataset: Dataset, *,
           epochs: int, batch_size: int, learning_rate: float, seed: int, chunk: int,
           augment: bool = False, log_dir=None) -> tuple[nn.Module, dict]:
    """(ablated model, its variables) of a trained population (Zee et al.'s layer ablation).

    `variables` hold the trained population (`params`, `batch_stats` where the model has BatchNorm)
    with a leading member axis. Member i's head is initialised and its batches drawn from seed
    `seed + i` (the streams of `compax.train.population`); the head is trained with
    optax.adam(learning_rate) on the mean softmax cross-entropy of `batch_size` shuffled training
    images (augmented with random flips and crops if `augment`) for `epochs` epochs, and each member
    keeps the head of its epoch with the lowest validation loss. `chunk` members are vmapped at a
    time. The result works like any trained population, e.g. `compress("float32", model, member)`.
    The per-epoch losses go to TensorBoard event files in `log_dir` (None: nowhere).
    """
    if epochs < 1:
        raise UserError(f"ablation epochs must be >= 1, got {epochs}: set the epochs of the ablate step")
    steps = len(dataset.train) // batch_size
    if steps == 0:
        raise UserError(f"batch_size {batch_size} exceeds the {len(dataset.train)} training images:"
                        " lower the batch size")
    model = ablated_model(model_name, num_classes, width)
    head = HEAD_LAYERS[model_name]
    seeds = jnp.arange(jax.tree.leaves(variables)[0].shape[0], dtype=jnp.int32) + seed

    def labels(params):
        return {name: jax.tree.map(lambda _, n=name: "head" if n in head else "body", layer)
                for name, layer in params.items()}

    tx = optax.multi_transform({"head": optax.adam(learning_rate), "body": optax.set_to_zero()}, labels)
    state = init_population(model, tx, seeds)
    # Adam's initial state is zeros whatever the parameters, so it stays valid for the transferred ones.
    start = transfer_body(variables, variables_of(state.params, state.batch_stats), head)
    state = state.replace(params=start["params"], batch_stats=start.get("batch_stats", {}),
                          best_params=start["params"], best_batch_stats=start.get("batch_stats", {}))

    train_step = make_train_step(_EvalModeModel(model), tx, dataset.mean, dataset.std, augment, chunk)
    predict = make_predict(model_apply(model), dataset.mean, dataset.std, batch_size, chunk)
    images, train_labels = jnp.asarray(dataset.train.images), jnp.asarray(dataset.train.labels)
    data_keys, aug_keys, dropout_keys = (member_keys(seeds, s) for s in (DATA, AUGMENT, DROPOUT))
    with ScalarWriter(log_dir) as scalars:
        for epoch in range(1, epochs + 1):
            order = epoch_order(data_keys, jnp.int32(epoch), len(dataset.train), steps, batch_size)
            params, opt_state = state.params, state.opt_state
            losses = []
            for step in range(steps):
                params, _, opt_state, loss, _ = train_step(
                    params, state.batch_stats, opt_state, order, aug_keys, dropout_keys, images,
                    train_labels, jnp.int32(epoch), jnp.int32(step))
                losses.append(loss)
            state = state.replace(params=params, opt_state=opt_state)
            val_loss, _ = loss_and_accuracy(
                predict(variables_of(params, state.batch_stats), dataset.val.images), dataset.val.labels)
            scalars.write(epoch, {"train_loss": jnp.stack(losses).mean(0), "val_loss": val_loss})
            # patience = epochs never stops a member early: every epoch runs, the best head is kept.
            state = update_early_stopping(state, jnp.asarray(val_loss), jnp.int32(epochs))
    return model, best_variables(state)


@register_step
@dataclasses.dataclass(frozen=True)
class Ablate(Step):
    """Recipe step `ablate(epochs)`: Zee et al.'s layer ablation of every member (module doc), with
    the run's batch size, learning rate, seeds and augmentation."""

    name: ClassVar[str] = "ablate"
    epochs: int = 5

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise UserError(f"ablate: epochs must be an integer >= 1, got {self.epochs!r}")

    def __call__(self, variant: Variant, ctx: Context) -> Variant:
        compressed, config = variant.compressed, ctx.config
        if compressed.qstate is not None or compressed.dtype != "float32":
            raise UserError("ablate retrains a float32 model: put it before quantize or cast")
        model_name = type(variant.model).__name__
        name = next((n for n, cls in MODELS.items() if cls.__name__ == model_name), None)
        if name not in HEAD_LAYERS:
            raise UserError(f"ablate knows the head layers of {', '.join(HEAD_LAYERS)}, not of"
                            f" {model_name}: add it to HEAD_LAYERS in compax/train/ablation.py")
        width, classes = variant.model.width, variant.model.num_classes
        if ctx.abstract:
            model = ablated_model(name, classes, width)
            size = jax.tree.leaves(compressed.variables)[0].shape[0]
            keys = jax.random.split(jax.random.key(0), size)
            variables = jax.eval_shape(jax.vmap(lambda k: init_variables(model, k)), keys)
        else:
            model, variables = ablate(
                name, classes, width, compressed.variables, ctx.dataset, epochs=self.epochs,
                batch_size=config.batch_size, learning_rate=config.learning_rate,
                seed=config.seed, chunk=ctx.chunk, augment=config.augment, log_dir=ctx.step_log_dir)
        return Variant(model, compressed.replace(variables=variables), dict(variant.info))
