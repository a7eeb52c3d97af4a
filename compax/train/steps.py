"""Pure, jit-compiled train and evaluation steps over a whole population at once (`jax.vmap`).

Training minimises the softmax cross-entropy (the negative log-likelihood of the study) with the
given optax optimizer. Images stay uint8 on the device; each step gathers every member's batch by
index, augments it with the member's own key (if enabled) and normalises it.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compax.data import augment_flip_crop, normalize
from compax.train.early_stopping import freeze_stopped
from compax.train.population import PopulationState, map_members, variables_of


def epoch_order(data_keys: jax.Array, epoch: jax.Array, num_examples: int, steps: int,
                batch_size: int) -> jax.Array:
    """Each member's shuffled example indices for `epoch`, shaped (P, steps, batch_size).

    The permutation comes from fold_in(data key, epoch); the last incomplete batch is dropped.
    """
    def member(key):
        order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
        return order[: steps * batch_size].reshape(steps, batch_size)
    return jax.vmap(member)(data_keys)


def make_train_step(model, tx: optax.GradientTransformation, mean: np.ndarray, std: np.ndarray,
                    augment: bool, chunk: int) -> Callable:
    """`train_step(state, images, labels, order, aug_keys, dropout_keys, epoch, step)`.

    `images` (N, H, W, C) uint8 and `labels` (N,) are the whole training set, `order` the output
    of `epoch_order`, the keys one per member. Returns the new state and the per-member loss and
    accuracy of the batch; members that stopped early keep their weights. `chunk` members at a
    time are vmapped (`map_members`).
    """
    def member_step(params, batch_stats, opt_state, images, labels, aug_key, dropout_key):
        if augment:
            images = augment_flip_crop(aug_key, images)
        x = normalize(images, mean, std)

        def loss_fn(p):
            logits, updates = model.apply(variables_of(p, batch_stats), x, train=True,
                                          mutable=["batch_stats"], rngs={"dropout": dropout_key})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, updates.get("batch_stats", {}))

        (loss, (logits, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return optax.apply_updates(params, updates), new_batch_stats, new_opt_state, loss, accuracy

    @jax.jit
    def train_step(state: PopulationState, images, labels, order, aug_keys, dropout_keys, epoch,
                   step):
        index = order[:, step]  # (P, B)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, epoch), step))
        params, batch_stats, opt_state, loss, accuracy = map_members(member_step, (
            state.params, state.batch_stats, state.opt_state, images[index], labels[index],
            step_keys(aug_keys), step_keys(dropout_keys)), chunk)
        return freeze_stopped(state, params, batch_stats, opt_state), loss, accuracy

    return train_step


def make_predict(model, mean: np.ndarray, std: np.ndarray, batch_size: int, chunk: int) -> Callable:
    """`predict(variables, images) -> logits (P, N, classes)` for a population's variables.

    `chunk` members at a time are vmapped (`map_members`).

    Runs in fixed-size batches (the last one padded) so that one compiled program serves any N.
    """
    @jax.jit
    def predict_batch(variables, images):
        x = normalize(images, mean, std)
        return map_members(lambda v: model.apply(v, x, train=False), (variables,), chunk)

    def predict(variables, images: np.ndarray) -> np.ndarray:
        num = images.shape[0]
        pad = (-num) % batch_size
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        batches = [predict_batch(variables, images[i:i + batch_size])
                   for i in range(0, images.shape[0], batch_size)]
        return np.concatenate([np.asarray(b) for b in batches], axis=1)[:, :num]

    return predict


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-member mean cross-entropy and accuracy of logits (P, N, C) against labels (N,)."""
    logits = jnp.asarray(logits)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)[None])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(labels)[None], axis=-1)
    return np.asarray(loss.mean(-1)), np.asarray(accuracy)
