"""Early stopping on validation loss, per population member (Prechelt 1998; the study's rule).

After each epoch, a member whose validation loss is lower than its best so far records the
current weights as its best; otherwise its counter of epochs without improvement grows, and at
`patience` epochs the member stops. Schwaiger et al. used patience 40 with the best weights restored.
"""

import jax
import jax.numpy as jnp

from compax.train.population import PopulationState


def _select(condition: jax.Array, new, old):
    """Per member: `new` where `condition`, else `old` (pytrees with a leading member axis)."""
    def pick(n, o):
        return jnp.where(condition.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
    return jax.tree_util.tree_map(pick, new, old)


@jax.jit
def update_early_stopping(state: PopulationState, val_loss: jax.Array, patience: jax.Array):
    """The state after an epoch whose per-member validation loss is `val_loss` (P,)."""
    epoch = state.epoch + 1
    improved = (val_loss < state.best_val_loss) & ~state.stopped
    since = jnp.where(improved, 0, state.epochs_since_best + (~state.stopped).astype(jnp.int32))
    return state.replace(
        epoch=epoch,
        best_params=_select(improved, state.params, state.best_params),
        best_batch_stats=_select(improved, state.batch_stats, state.best_batch_stats),
        best_val_loss=jnp.where(improved, val_loss, state.best_val_loss),
        best_epoch=jnp.where(improved, epoch, state.best_epoch),
        epochs_since_best=since,
        stopped=state.stopped | (since >= patience),
    )
