"""Layer ablation: the dropped blocks and head shapes of every model, exact transfer of the frozen
body (parameters and BatchNorm statistics), the retrained head, accuracy, and population semantics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compax.compress import apply_compressed
from compax.compress.methods.ablation import _EvalModeModel, ablate, ablated_model, head_layers, transfer_body
from compax.data import normalize
from compax.errors import UserError
from compax.member_vmap import model_apply, take_members
from compax.models import get_model, init_variables, model_class
from compax.models.layers import scaled
from compax.one_model import compress
from compax.train.population import INIT, member_keys
from compax.train.steps import epoch_order, make_train_step
from tests.helpers import tiny_dataset


def random_population(model, members: int, seed: int) -> dict:
    """Stand-in for a trained population, drawn with numpy (fast, and unlike any flax init): kernels
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases N(0, 0.1), BatchNorm running means N(0, 0.5) and
    variances U(0.5, 2)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))

    def draw(path, leaf):
        name, shape = path[-1].key, (members, *leaf.shape)
        if name == "kernel":
            bound = 1 / np.sqrt(np.prod(leaf.shape[:-1]))
            value = rng.uniform(-bound, bound, shape)
        elif name == "var":
            value = rng.uniform(0.5, 2, shape)
        elif name == "scale":
            value = rng.uniform(0.8, 1.2, shape)
        else:  # bias, mean
            value = rng.normal(0, 0.5 if name == "mean" else 0.1, shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def layer_shapes(variables) -> dict:
    """{(collection, 'layer/sub/leaf'): shape} of a variables pytree."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {(path[0].key, "/".join(k.key for k in path[1:])): leaf.shape for path, leaf in flat}


def bits(x):
    return np.asarray(x).view(np.uint32)


# model -> (width, layers dropped, (head layer, its input size in the ablated model))
ABLATIONS = {
    "lenet5": (1.0, ("conv2",), ("fc1", 14 * 14 * 6)),
    "resnet18": (0.125, ("layer4_0", "layer4_1"), ("fc", scaled(256, 0.125))),
    "squeezenet": (0.25, ("fire8",), ("classifier", 2 * scaled(256, 0.25))),
    "vgg6": (0.25, ("conv6", "bn6"), ("fc1", 8 * 8 * scaled(128, 0.25))),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablated_model_drops_the_last_block_and_keeps_every_other_layer(name):
    width, dropped, (first_head, head_inputs) = ABLATIONS[name]
    full = get_model(name, 7, width)
    ablated = ablated_model(full)
    assert not full.drop_last_block and ablated.drop_last_block
    full_shapes = layer_shapes(jax.eval_shape(lambda: init_variables(full, jax.random.key(0))))
    ablated_vars = jax.eval_shape(lambda: init_variables(ablated, jax.random.key(0)))
    ablated_shapes = layer_shapes(ablated_vars)
    top = {key.split("/")[0] for _, key in full_shapes}
    assert top - {key.split("/")[0] for _, key in ablated_shapes} == set(dropped)
    for (collection, key), shape in ablated_shapes.items():
        if key.split("/")[0] not in head_layers(full):
            assert full_shapes[collection, key] == shape, key  # the body transfers one to one
    kernel = ablated_vars["params"][first_head]["kernel"].shape
    assert int(np.prod(kernel[:-1])) == head_inputs
    logits = jax.eval_shape(lambda v: ablated.apply(v, jnp.zeros((3, 32, 32, 3)), train=False), ablated_vars)
    assert logits.shape == (3, 7)


def test_a_registered_variant_keeps_its_own_head():
    # squeezenet_torchvision is SqueezeNet with its class maps rectified: the ablated model keeps
    # the ReLU, and shares SqueezeNet's head layers and CPU size.
    torchvision = get_model("squeezenet_torchvision", 7, 0.25)
    ablated = ablated_model(torchvision)
    assert ablated.classifier_relu and ablated.drop_last_block and ablated.width == 0.25
    assert head_layers(ablated) == head_layers(get_model("squeezenet", 7)) == ("classifier",)
    assert model_class("squeezenet_torchvision") is model_class("squeezenet")


@pytest.fixture(scope="module")
def lenet_ablation():
    dataset = tiny_dataset()
    trained = random_population(get_model("lenet5", dataset.num_classes), members=2, seed=0)
    model, variables, _ = ablate(get_model("lenet5", dataset.num_classes, 1.0), trained, dataset, epochs=3,
                                 batch_size=32, learning_rate=3e-3, seed=5, chunk=1)
    return dataset, trained, model, variables


def test_lenet_body_is_frozen_bit_for_bit_and_the_head_is_retrained(lenet_ablation):
    dataset, trained, model, variables = lenet_ablation
    params = variables["params"]
    assert set(variables) == {"params"} and set(params) == {"conv1", "fc1", "fc2", "fc3"}
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(bits(params["conv1"][leaf]), bits(trained["params"]["conv1"][leaf]))
    initial = jax.vmap(lambda k: init_variables(model, k))(member_keys(jnp.arange(2) + 5, INIT))["params"]
    for layer in ("fc1", "fc2", "fc3"):
        for member in range(2):  # every member's head left its initialisation
            assert not np.allclose(params[layer]["kernel"][member], initial[layer]["kernel"][member])
    assert params["fc3"]["kernel"].shape == trained["params"]["fc3"]["kernel"].shape
    assert not np.allclose(params["fc3"]["kernel"], trained["params"]["fc3"]["kernel"])


def test_lenet_ablation_learns_the_tiny_dataset_and_works_as_a_variant(lenet_ablation):
    dataset, _, model, variables = lenet_ablation
    x = normalize(dataset.test.images, dataset.mean, dataset.std)
    for member in range(2):
        compressed = compress("float32", model, take_members(variables, member))
        logits = np.asarray(apply_compressed(model, compressed, x))
        np.testing.assert_array_equal(logits, model.apply(take_members(variables, member), x, train=False))
        assert (logits.argmax(-1) == dataset.test.labels).mean() >= 0.8  # chance is 0.25


def test_a_member_is_the_ablation_of_its_own_seed(lenet_ablation):
    dataset, trained, _, variables = lenet_ablation
    # Members in reverse order from seed 4: trained member 0 is now member 1, with seed 4 + 1 = 5 as before.
    _, reversed_run, _ = ablate(get_model("lenet5", dataset.num_classes, 1.0),
                                take_members(trained, np.array([1, 0])), dataset, epochs=3,
                                batch_size=32, learning_rate=3e-3, seed=4, chunk=1)
    for got, want in zip(jax.tree.leaves(take_members(reversed_run, 1)),
                         jax.tree.leaves(take_members(variables, 0)), strict=True):
        np.testing.assert_array_equal(got, want)


def test_vgg_body_transfers_with_its_batchnorm_statistics():
    model = ablated_model(get_model("vgg6", 4, 0.25))
    trained = random_population(get_model("vgg6", 4, 0.25), members=2, seed=1)
    initial = random_population(model, members=2, seed=2)
    variables = transfer_body(trained, initial, head_layers(model))
    batchnorms = {f"bn{i}" for i in range(1, 6)}
    assert set(variables["params"]) == {f"conv{i}" for i in range(1, 6)} | batchnorms | {"fc1", "fc2", "fc3"}
    assert set(variables["batch_stats"]) == batchnorms
    for (collection, key), _ in layer_shapes(variables).items():
        layer, leaf = key.split("/")
        source = initial if layer in head_layers(model) else trained
        assert variables[collection][layer][leaf] is source[collection][layer][leaf]


def test_head_training_runs_the_frozen_batchnorms_in_evaluation_mode():
    # The training loss of a step is the cross-entropy of the model in evaluation mode (running
    # statistics), and the BatchNorm statistics come back unchanged.
    dataset = tiny_dataset(per_class=16)
    model = ablated_model(get_model("vgg6", dataset.num_classes, 0.25))
    variables = random_population(model, members=1, seed=3)
    tx = optax.adam(1e-3)
    step = make_train_step(_EvalModeModel(model), tx, dataset.mean, dataset.std, False, chunk=1)
    order = epoch_order(jax.random.split(jax.random.key(0), 1), jnp.int32(1), len(dataset.train), 2, 16)
    keys = jax.random.split(jax.random.key(1), 1)
    _, batch_stats, _, loss, _ = step(variables["params"], variables["batch_stats"],
                                      jax.vmap(tx.init)(variables["params"]), order, keys, keys,
                                      jnp.asarray(dataset.train.images), jnp.asarray(dataset.train.labels),
                                      jnp.int32(1), jnp.int32(0))
    batch = np.asarray(order[0, 0])
    logits = jax.jit(model_apply(model))(take_members(variables, 0),
                                         normalize(dataset.train.images[batch], dataset.mean, dataset.std))
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, dataset.train.labels[batch]).mean()
    np.testing.assert_allclose(loss[0], expected, rtol=1e-5)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), batch_stats,
                                     variables["batch_stats"]))


@pytest.mark.slow
def test_vgg_ablation_keeps_its_batchnorm_body_and_trains_its_head():
    dataset = tiny_dataset(per_class=16)
    trained = random_population(get_model("vgg6", dataset.num_classes, 0.25), members=1, seed=1)
    model, variables, _ = ablate(get_model("vgg6", dataset.num_classes, 0.25), trained, dataset, epochs=1,
                                 batch_size=16, learning_rate=1e-3, seed=0, chunk=1)
    for collection in ("params", "batch_stats"):
        for layer, leaves in variables[collection].items():
            for leaf, value in leaves.items():
                if layer in head_layers(model):
                    continue
                np.testing.assert_array_equal(bits(value), bits(trained[collection][layer][leaf]))
    assert "conv6" not in variables["params"] and "bn6" not in variables["batch_stats"]
    initial = jax.vmap(lambda k: init_variables(model, k))(member_keys(jnp.arange(1), INIT))["params"]
    assert not np.allclose(variables["params"]["fc3"]["kernel"], initial["fc3"]["kernel"])
    logits = apply_compressed(model, compress("float32", model, take_members(variables, 0)),
                              normalize(dataset.test.images, dataset.mean, dataset.std))
    assert logits.shape == (len(dataset.test), dataset.num_classes) and bool(jnp.isfinite(logits).all())


def test_bad_inputs_are_user_errors():
    dataset = tiny_dataset(per_class=8)
    model = ablated_model(get_model("lenet5", dataset.num_classes, 1.0))
    keys = jax.random.split(jax.random.key(0), 2)
    ablated = jax.eval_shape(jax.vmap(lambda k: init_variables(model, k)), keys)
    narrow = random_population(get_model("lenet5", dataset.num_classes, 0.5), members=2, seed=0)
    with pytest.raises(UserError, match="no layer 'conv1'"):
        transfer_body(narrow, ablated, head_layers(model))
    single = take_members(random_population(get_model("lenet5", dataset.num_classes), 1, seed=0), 0)
    with pytest.raises(UserError, match="leading member axis"):
        transfer_body(single, ablated, head_layers(model))
    with pytest.raises(UserError, match="head_layers"):
        head_layers(nn.Dense(3))  # a class that does not name its head
    with pytest.raises(UserError, match="epochs must be >= 1"):
        ablate(get_model("lenet5", dataset.num_classes, 0.5), narrow, dataset, epochs=0, batch_size=8,
               learning_rate=1e-3, seed=0, chunk=1)


class _Headless(nn.Module):
    """A registered model that names no head layers."""

    num_classes: int
    width: float = 1.0

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def test_ablating_a_model_without_head_layers_is_refused_before_any_stage(monkeypatch):
    from compax.config import base_config
    from compax.models import MODELS
    from compax.validate import validate_config

    monkeypatch.setitem(MODELS, "headless", _Headless)
    config = base_config()
    config.model = "headless"
    config.compress.variants = ("w8a8", "ablated")
    with pytest.raises(UserError, match="head layers of _Headless"):
        validate_config(config)
    config.compress.variants = ("w8a8", "pruned")  # the other steps run on any model
    validate_config(config)
