"""Pure, jit-compiled train and evaluation steps over a whole population at once (`jax.vmap`).

Training minimises a loss of the logits, by default the softmax cross-entropy (the negative
log-likelihood of the study; `cross_entropy`), with the given optax optimizer. Images stay uint8
on the device; each step gathers every member's batch by index, augments it with the member's own
key (if enabled) and normalises it.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from compax.data import augment_flip_crop, normalize
from compax.distributed import default_mesh, shard_batch
from compax.errors import UserError
from compax.kernels import cpu_convolutions
from compax.member_vmap import chunked_vmap
from compax.train.population import variables_of


def epoch_order(data_keys: jax.Array, epoch: jax.Array, num_examples: int, steps: int,
                batch_size: int) -> jax.Array:
    """Each member's shuffled example indices for `epoch`, shaped (P, steps, batch_size).

    The permutation comes from fold_in(data key, epoch); the last incomplete batch is dropped.
    """
    def member(key):
        order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
        return order[: steps * batch_size].reshape(steps, batch_size)
    return jax.vmap(member)(data_keys)


def cross_entropy(logits: jax.Array, labels: jax.Array, variables, x: jax.Array) -> jax.Array:
    """The mean softmax cross-entropy of `logits` against integer `labels`: the default `loss` of
    the train steps, which call it as `loss(logits, labels, variables, x)` with the member's
    variables and its normalised (augmented) batch `x`; this one uses neither."""
    del variables, x
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_member_step(model, tx: optax.GradientTransformation, mean: np.ndarray, std: np.ndarray,
                     augment: bool, mesh: Mesh | None = None, loss: Callable = cross_entropy) -> Callable:
    """`member_step(params, batch_stats, opt_state, order, aug_key, dropout_key, images, labels,
    epoch, step) -> (params, batch_stats, opt_state, loss, accuracy)` of one member (no member axis).
    It minimises `loss(logits, labels, variables, x)` (`cross_entropy`).

    It trains on the images `order[step]` of the whole training set `images` (N, H, W, C) uint8
    and `labels` (N,), augmented with fold_in(fold_in(aug_key, epoch), step) if `augment`, its
    dropout keyed alike; its batch is split over the `data` axis of `mesh` (`shard_batch`).
    """
    mesh = mesh or default_mesh()

    def member_step(params, batch_stats, opt_state, order, aug_key, dropout_key, images, labels,
                    epoch, step):
        index = order[step]
        labels = labels[index]
        images = images[index]
        aug_key, dropout_key = (jax.random.fold_in(jax.random.fold_in(k, epoch), step)
                                for k in (aug_key, dropout_key))
        if augment:
            images = augment_flip_crop(aug_key, images)
        x = shard_batch(normalize(images, mean, std), mesh)

        def loss_fn(p):
            variables = variables_of(p, batch_stats)
            with cpu_convolutions():
                logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                              rngs={"dropout": dropout_key})
                value = loss(logits, labels, variables, x)
            return value, (logits, updates.get("batch_stats", {}))

        (value, (logits, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return optax.apply_updates(params, updates), new_batch_stats, new_opt_state, value, accuracy

    return member_step


def make_train_step(model, tx: optax.GradientTransformation, mean: np.ndarray, std: np.ndarray,
                    augment: bool, chunk: int, mesh: Mesh | None = None,
                    loss: Callable = cross_entropy) -> Callable:
    """`train_step(params, batch_stats, opt_state, order, aug_keys, dropout_keys, images, labels,
    epoch, step) -> (params, batch_stats, opt_state, loss, accuracy)`.

    The first six arguments have a leading member axis (`order` from `epoch_order`, one key per
    member); `images` (N, H, W, C) uint8 and `labels` (N,) are the whole training set, shared.
    `chunk` members at a time are vmapped and split over the devices of `mesh` (`chunked_vmap`),
    each member's batch over the mesh's `data` axis (`shard_batch`); `loss` as `make_member_step`'s.
    """
    mesh = mesh or default_mesh()
    member_step = make_member_step(model, tx, mean, std, augment, mesh, loss)
    return chunked_vmap(member_step, chunk, num_member_args=6, mesh=mesh)


# Train steps per call of `make_train_steps` at most (`steps_per_call`).
MAX_STEPS_PER_CALL = 8


def steps_per_call(steps: int) -> int:
    """The largest divisor of an epoch's `steps` up to `MAX_STEPS_PER_CALL`: calls of that many
    steps cover the epoch with one compiled program."""
    return max(k for k in range(1, min(steps, MAX_STEPS_PER_CALL) + 1) if steps % k == 0)


def make_train_steps(model, tx: optax.GradientTransformation, mean: np.ndarray, std: np.ndarray,
                     augment: bool, chunk: int, num_steps: int, mesh: Mesh | None = None,
                     group: int = 0, loss: Callable = cross_entropy) -> Callable:
    """`train_steps(params, batch_stats, opt_state, order, aug_keys, dropout_keys, images, labels,
    epoch, first_step) -> (params, batch_stats, opt_state, losses, accuracies)`: `num_steps`
    steps of `make_train_step`'s, first_step, first_step + 1, ..., in one call.

    Each member runs its steps in a `lax.scan` of `make_member_step`'s step, with the same
    arguments as `make_train_step` gives it; `losses` and `accuracies` are (P, num_steps).
    Members go through `chunked_vmap` in chunks of `chunk`, `group` at a time (`train_chunking`).
    """
    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}")
    mesh = mesh or default_mesh()
    member_step = make_member_step(model, tx, mean, std, augment, mesh, loss)

    def member_steps(params, batch_stats, opt_state, order, aug_key, dropout_key, images, labels,
                     epoch, first_step):
        def body(carry, step):
            *trained, loss, accuracy = member_step(*carry, order, aug_key, dropout_key, images,
                                                   labels, epoch, step)
            return tuple(trained), (loss, accuracy)

        steps = first_step + jnp.arange(num_steps, dtype=jnp.int32)
        trained, (losses, accuracies) = jax.lax.scan(body, (params, batch_stats, opt_state), steps)
        return *trained, losses, accuracies

    return chunked_vmap(member_steps, chunk, num_member_args=6, mesh=mesh, group=group)
