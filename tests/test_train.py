"""Training: learning, early stopping per member, populations vs separate runs, resume, NaN."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compax.member_vmap import CPU_MEMBER_GROUP, train_chunking
from compax.models import get_model
from compax.train import TrainingDiverged, fit, init_population
from compax.train.early_stopping import update_early_stopping
from compax.train.population import AUGMENT, DATA, DROPOUT, member_keys
from compax.train.steps import epoch_order, make_train_step, make_train_steps, steps_per_call
from tests.helpers import tiny_config, tiny_dataset


@pytest.fixture(scope="module")
def data():
    return tiny_dataset()


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_training_lowers_the_loss_and_learns(data, tmp_path):
    result = fit(tiny_config(max_epochs=4), data, tmp_path)
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"][0] < history[0]["train_loss"][0]
    assert history[-1]["val_loss"][0] < history[0]["val_loss"][0]
    assert max(h["val_accuracy"][0] for h in history) > 0.5  # chance is 0.25
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_early_stopping_keeps_best_weights_and_freezes_each_member_on_its_own():
    model = get_model("lenet5", 4, width=0.25)
    state = init_population(model, optax.adam(1e-3), jnp.arange(2))
    patience = jnp.int32(2)
    # Member 0 improves at epochs 1 and 2 then stalls; member 1 improves only at epoch 1.
    val_losses = [(1.0, 1.0), (0.5, 2.0), (0.7, 3.0), (0.9, 0.1), (0.8, 0.1)]
    snapshots = []
    for epoch, losses in enumerate(val_losses, start=1):
        # Mark the weights with the epoch so that "best weights" can be read back.
        stopped = state.stopped

        def mark(p, e=epoch, stopped=stopped):
            return jnp.where(stopped.reshape((-1,) + (1,) * (p.ndim - 1)), p, jnp.full_like(p, e))

        state = state.replace(params=jax.tree_util.tree_map(mark, state.params))
        state = update_early_stopping(state, jnp.asarray(losses, jnp.float32), patience)
        snapshots.append((np.asarray(state.best_epoch), np.asarray(state.stopped)))
    assert snapshots[1][0].tolist() == [2, 1]
    assert snapshots[2][1].tolist() == [False, True]  # member 1: two epochs without improvement
    assert snapshots[3][0].tolist() == [2, 1]  # the stopped member ignores its later 0.1
    assert snapshots[3][1].tolist() == [True, True]
    best = np.asarray(state.best_params["fc1"]["kernel"])
    assert np.all(best[0] == 2) and np.all(best[1] == 1)


def test_stopped_member_is_frozen_while_the_other_trains(data, tmp_path):
    # patience 1: members stop after their first epoch without improvement, at different times.
    result = fit(tiny_config(population=3, max_epochs=6, patience=1, learning_rate=3e-3), data,
                 tmp_path)
    active = np.array([h["active"] for h in result.history])
    assert active.shape[1] == 3
    assert (active[:-1] >= active[1:]).all()  # once stopped, never active again
    stopped_members = ~active[-1]
    for member in np.flatnonzero(stopped_members):
        stop_epoch = np.flatnonzero(~active[:, member])[0]  # first epoch it sat out
        assert np.isnan(result.history[stop_epoch]["train_loss"][member])
    best_epoch = np.asarray(result.state.best_epoch)
    assert (best_epoch >= 1).all()


def test_population_members_equal_separate_runs(data, tmp_path):
    population = fit(tiny_config(population=2, seed=5), data, tmp_path / "pop")
    alone = fit(tiny_config(population=1, seed=6), data, tmp_path / "alone")
    member = jax.tree_util.tree_map(lambda x: x[1], population.variables)
    single = jax.tree_util.tree_map(lambda x: x[0], alone.variables)
    for a, b in zip(leaves(member), leaves(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert population.history[-1]["val_loss"][1] == pytest.approx(
        alone.history[-1]["val_loss"][0], rel=1e-4)


def test_resumed_run_ends_with_the_same_parameters(data, tmp_path):
    config = tiny_config(population=2, max_epochs=4, augment=True)
    straight = fit(config, data, tmp_path / "straight")
    config.max_epochs = 2  # a run stopped after its second epoch's checkpoint ...
    fit(config, data, tmp_path / "resumed")
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"epoch": 3, "partial": True}) + "\n")  # ... killed mid-epoch 3
    config.max_epochs = 4
    resumed = fit(config, data, tmp_path / "resumed")
    for a, b in zip(leaves(straight.state), leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
    epochs = [json.loads(line)["epoch"]
              for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_nan_loss_stops_with_epoch_and_step(data, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+ .*learning_rate"):
        fit(tiny_config(learning_rate=1e38), data, tmp_path)


def test_chunked_population_equals_one_vmap(data, tmp_path):
    one_vmap = fit(tiny_config(population=3, population_chunk=3, max_epochs=2), data,
                   tmp_path / "vmap")
    chunked = fit(tiny_config(population=3, population_chunk=2, max_epochs=2), data,
                  tmp_path / "chunks")
    for a, b in zip(leaves(one_vmap.state), leaves(chunked.state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group", [0, 2])  # 2: a group of 2 members and a group of 1
def test_train_steps_in_one_call_equal_one_step_calls(data, group):
    """Four steps in one call (a `lax.scan`) give the bits of four calls of one step each, and
    the values of `make_train_step`'s steps (every member vmapped at once)."""
    model = get_model("lenet5", data.num_classes)
    tx = optax.adam(1e-3)
    seeds = jnp.arange(3)
    state = init_population(model, tx, seeds)
    batch, steps = 32, 4
    order = epoch_order(member_keys(seeds, DATA), jnp.int32(1), len(data.train), steps, batch)
    members = (order, member_keys(seeds, AUGMENT), member_keys(seeds, DROPOUT))
    shared = (jnp.asarray(data.train.images), jnp.asarray(data.train.labels), jnp.int32(1))
    start = (state.params, state.batch_stats, state.opt_state)

    def one_call_per_step(step_fn):
        trained, losses = start, []
        for step in range(steps):
            *trained, loss, _ = step_fn(*trained, *members, *shared, jnp.int32(step))
            losses.append(loss)
        return trained, losses

    make = (model, tx, data.mean, data.std, True, 3)
    *together, losses, accuracies = make_train_steps(*make, steps, group=group)(
        *start, *members, *shared, jnp.int32(0))
    assert losses.shape == accuracies.shape == (3, steps)
    trained, step_losses = one_call_per_step(make_train_steps(*make, 1, group=group))
    for a, b in zip(leaves(together), leaves(trained), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(losses, jnp.concatenate(step_losses, axis=1))
    trained, step_losses = one_call_per_step(make_train_step(*make))
    for a, b in zip(leaves(together), leaves(trained), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(losses, jnp.stack(step_losses, axis=1), rtol=1e-5)


def test_train_chunking_and_steps_per_call():
    # Automatic on one CPU: the whole population in one program, a few members vmapped at a time.
    assert train_chunking(0, 32) == (32, CPU_MEMBER_GROUP)
    assert train_chunking(0, 2) == (2, 2)
    assert train_chunking(3, 32) == (3, 0)  # a chunk asked for: every member of it vmapped at once
    assert [steps_per_call(s) for s in (1, 3, 11, 12, 16, 306)] == [1, 3, 1, 6, 8, 6]
    with pytest.raises(ValueError, match="population_chunk"):
        train_chunking(-1, 4)
