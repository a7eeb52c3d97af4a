"""Layer ablation (Zee, Lakshmana and Nwogu): drop the last conv block, freeze the rest, retrain the head.

The ablated model is the trained model built with `drop_last_block=True` (LeNet-5 without conv2 and
its pool, ResNet-18 without the stage layer4_*, SqueezeNet without fire8, VGG-6 without conv6 and
its pool). Its layers keep their names, so every layer before the dropped block (the body) takes the
trained weights unchanged and stays frozen, while the layers after it (the head, the model class's
`head_layers`: the dense layers, SqueezeNet's 1x1 classifier convolution) are initialised afresh and
trained with Adam on the softmax cross-entropy. The change in accuracy (and every other analysis of
the variant) measures how much the dropped block contributed beyond what the head can recover from
the earlier features.

The head is trained with the whole model in evaluation mode: frozen BatchNorm layers normalise with
their running statistics, in training exactly as at test time, and keep them; SqueezeNet's dropout
(before its classifier) is off. The frozen layers get zero updates (`optax.multi_transform` with
`optax.set_to_zero`), so they keep their trained values exactly.

As a recipe step: `ablate(epochs=5)` (the recipe `ablated`). Its training is
`compax.train.retrain`'s: each epoch's training and validation loss per member go to TensorBoard
event files (`<workdir>/tensorboard/<variant>/ablate` in a run), each epoch ends with a checkpoint
(`<workdir>/step_checkpoints/<variant>/ablate`) from which a killed run resumes, and its cost is
reported under `training.ablate`.
"""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compax.compress.methods.training import check_learning_rate, required_learning_rate
from compax.compress.registry import Context, Step, Variant, register_step
from compax.data import Dataset
from compax.errors import UserError
from compax.models import init_variables
from compax.train.population import init_population, variables_of
from compax.train.retrain import Trainable, TrainingRun, train_population


def ablated_model(model: nn.Module) -> nn.Module:
    """`model` (a registered model) without its last conv block (`drop_last_block=True`)."""
    return model.clone(drop_last_block=True)


def head_layers(model: nn.Module) -> tuple[str, ...]:
    """The layers after the dropped block, which the ablation re-initialises and trains: the model
    class's `head_layers` (a UserError for a class that does not name them)."""
    head = getattr(type(model), "head_layers", None)
    if head is None:
        raise UserError(f"ablate needs the head layers of {type(model).__name__}: give the class a"
                        " `head_layers: ClassVar[tuple[str, ...]]` attribute (compax/models/)")
    return head


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


class _EvalModeModel(Trainable):
    """`model` as `make_train_step` calls it, always in evaluation mode and with nothing mutable."""

    def apply(self, variables, x, train, mutable, rngs):
        del train, mutable, rngs  # frozen BatchNorm statistics, no dropout (see the module doc)
        # The statistics come back unchanged, so that a scan over train steps keeps its carry.
        return self.model.apply(variables, x, train=False), {
            "batch_stats": variables.get("batch_stats", {})}


def ablate(trained_model: nn.Module, variables: dict, dataset: Dataset, *,
           epochs: int, batch_size: int, learning_rate: float, seed: int, chunk: int,
           augment: bool = False, log_dir=None, checkpoint_dir=None) -> tuple[nn.Module, dict, dict]:
    """(ablated model, its variables, training info) of a trained population (Zee et al.'s layer
    ablation).

    `variables` hold the population of `trained_model`, a registered model (`params`, `batch_stats`
    where the model has BatchNorm), with a leading member axis. Member i's head is initialised and
    its batches drawn from seed `seed + i` (the streams of `compax.train.population`); the head is
    trained with optax.adam(learning_rate) on the mean softmax cross-entropy of `batch_size`
    shuffled training images (augmented with random flips and crops if `augment`) for `epochs`
    epochs, and each member keeps the head of its epoch with the lowest validation loss. `chunk`
    members are vmapped at a time. The result works like any trained population, e.g.
    `compress("float32", model, member)`. The training is `compax.train.retrain`'s: per-epoch
    losses go to TensorBoard event files in `log_dir`, checkpoints to `checkpoint_dir` (None:
    nowhere); the info is its cost.
    """
    if epochs < 1:
        raise UserError(f"ablation epochs must be >= 1, got {epochs}: set the epochs of the ablate step")
    model = ablated_model(trained_model)
    head = head_layers(model)
    seeds = jnp.arange(jax.tree.leaves(variables)[0].shape[0], dtype=jnp.int32) + seed

    def labels(params):
        return {name: jax.tree.map(lambda _, n=name: "head" if n in head else "body", layer)
                for name, layer in params.items()}

    tx = optax.multi_transform({"head": optax.adam(learning_rate), "body": optax.set_to_zero()}, labels)
    initial = init_population(model, tx, seeds)
    start = transfer_body(variables, variables_of(initial.params, initial.batch_stats), head)
    run = TrainingRun(dataset, batch_size, batch_size, seed, augment, chunk, log_dir, checkpoint_dir)
    trained = train_population(
        _EvalModeModel(model), tx, start["params"], start.get("batch_stats", {}), run, epochs=epochs,
        patience=None, identity=f"ablate(epochs={epochs}) of {type(model).__name__}",
        learning_rate_note=learning_rate, start_candidate=False)
    return model, variables_of(trained.params, trained.batch_stats), trained.info


@register_step
@dataclasses.dataclass(frozen=True)
class Ablate(Step):
    """Recipe step `ablate(epochs, learning_rate)`: Zee et al.'s layer ablation of every member
    (module doc) with Adam at `learning_rate` (parsing with the run's config fills in its
    `learning_rate`; unfilled, a UserError when it trains) and the run's batch size, seeds and
    augmentation (read from the context)."""

    name: ClassVar[str] = "ablate"
    config_defaults: ClassVar[dict[str, str]] = {"learning_rate": "learning_rate"}
    epochs: int = 5
    learning_rate: float | None = None

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise UserError(f"ablate: epochs must be an integer >= 1, got {self.epochs!r}")
        check_learning_rate(self.name, self.learning_rate)

    def check(self, model) -> None:
        head_layers(model)

    def __call__(self, variant: Variant, ctx: Context) -> Variant:
        compressed = variant.compressed
        if compressed.qstate is not None or compressed.dtype != "float32":
            raise UserError("ablate retrains a float32 model: put it before quantize or cast")
        info = dict(variant.info)
        if ctx.abstract:
            model = ablated_model(variant.model)
            size = jax.tree.leaves(compressed.variables)[0].shape[0]
            keys = jax.random.split(jax.random.key(0), size)
            variables = jax.eval_shape(jax.vmap(lambda k: init_variables(model, k)), keys)
        else:
            model, variables, training = ablate(
                variant.model, compressed.variables, ctx.dataset, epochs=self.epochs,
                batch_size=ctx.batch_size,
                learning_rate=required_learning_rate(self.name, self.learning_rate),
                seed=ctx.seed, chunk=ctx.chunk, augment=ctx.augment, log_dir=ctx.step_log_dir,
                checkpoint_dir=ctx.step_checkpoint_dir)
            info["training"] = {**info.get("training", {}), self.name: training}
        return Variant(model, compressed.replace(variables=variables), info)
