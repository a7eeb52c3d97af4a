"""A population of independently trained models, held as one pytree with a leading member axis.

Member `i` of a population with base seed `s` is the model trained with seed `s + i`, so a
population of one is exactly a single-seed run and a population's member equals the separate run
of its seed (Hooker et al. train 30 such models per variant). Every random choice of a member
(initialisation, data order, augmentation, dropout) comes from its own seed through
`jax.random.fold_in`, never from the population's size or the member's position.
"""

import flax
import jax
import jax.numpy as jnp
import optax

from compax.models import init_variables

# Streams derived from a member's seed.
INIT, DATA, AUGMENT, DROPOUT = range(4)


def member_keys(seeds: jax.Array, stream: int) -> jax.Array:
    """One PRNG key per member for `stream` (INIT, DATA, AUGMENT or DROPOUT): fold_in(key(seed), stream)."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), stream))(seeds)


@flax.struct.dataclass
class PopulationState:
    """Training state of every member, each array with a leading member axis.

    `best_*` hold the weights of the epoch with the lowest validation loss so far (early stopping
    restores them); a member whose validation loss has not improved for `patience` epochs is
    `stopped` and its weights no longer change while the others go on.
    """

    epoch: jax.Array  # () int32, epochs completed
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    best_params: dict
    best_batch_stats: dict
    best_val_loss: jax.Array  # (P,) float32
    best_epoch: jax.Array  # (P,) int32, 0 before any epoch
    epochs_since_best: jax.Array  # (P,) int32
    stopped: jax.Array  # (P,) bool

    @property
    def size(self) -> int:
        return self.best_val_loss.shape[0]


def init_population(model, tx: optax.GradientTransformation, seeds: jax.Array) -> PopulationState:
    """Initial state of a population with one member per seed in `seeds` (int array)."""
    variables = jax.vmap(lambda k: init_variables(model, k))(member_keys(seeds, INIT))
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    size = seeds.shape[0]
    return PopulationState(
        epoch=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=jax.vmap(tx.init)(params),
        best_params=params,
        best_batch_stats=batch_stats,
        best_val_loss=jnp.full((size,), jnp.inf, jnp.float32),
        best_epoch=jnp.zeros((size,), jnp.int32),
        epochs_since_best=jnp.zeros((size,), jnp.int32),
        stopped=jnp.zeros((size,), bool),
    )


def variables_of(params: dict, batch_stats: dict) -> dict:
    """The flax variables dict for `apply`: `params`, plus `batch_stats` when the model has them."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def best_variables(state: PopulationState) -> dict:
    """Variables of every member at its best validation epoch (what early stopping keeps)."""
    return variables_of(state.best_params, state.best_batch_stats)
