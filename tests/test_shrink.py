"""Structured pruning with the filters removed (`compress.shrink`), against the zeroed dense model.

The reference never uses the channel graph `shrink` derives: the filters are those of
`structured.layer_filter_masks` on the layers listed here by hand, and in the dense model their
kernels, biases and the scale and shift of the BatchNorm directly after them are set to zero.
A removed channel is then zero wherever it goes, so the shrunk model must give the same logits.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from compax.compress.shrink import Shrunk, channel_graph, count_model_macs, shrink, shrunk_apply
from compax.compress.structured import layer_filter_masks
from compax.errors import UserError
from compax.models import get_model

# model, width, the layers pruned (as an exclude pattern of the others), BatchNorm after a layer
CASES = {
    "lenet5": (1.0, r"^fc3/", lambda layer: None),
    "vgg6": (1.0, r"^fc3/", lambda layer: layer.replace("conv", "bn") if "conv" in layer else None),
    "resnet18": (0.25, r"^(?!layer\d_\d/conv1/)", lambda layer: layer.replace("conv1", "bn1")),
    "squeezenet": (0.5, r"^classifier/", lambda layer: None),
}


def random_variables(model, seed: int):
    """Variables drawn with NumPy: kernels U(+-1/sqrt(fan_in)) scaled so activations keep their
    size, biases and BatchNorm shifts and means U(+-0.2), BatchNorm scales and variances U(0.5, 1.5)
    (nonzero shifts make a removed channel's constant output matter)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            bound = np.sqrt(3.0 / np.prod(leaf.shape[:-1]))
            return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
        low, high = (0.5, 1.5) if name in ("scale", "var") else (-0.2, 0.2)
        return rng.uniform(low, high, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def pruned_filters(kernel, amount):
    """The round(amount * C) filters of smallest L1 norm, equal norms lower channel first (NumPy)."""
    norms = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
    return np.argsort(norms, kind="stable")[:round(amount * kernel.shape[-1])]


def zeroed_reference(variables, amount, exclude, bn_after):
    """The dense variables with the pruned filters' kernels, biases and following BatchNorm scales
    and biases set to zero, in NumPy; and {layer: kept channel flags}."""
    flat = {k: np.array(v) for k, v in traverse_util.flatten_dict(variables["params"], sep="/").items()}
    kept = {}
    for key in [k for k in flat if k.endswith("/kernel") and not re.search(exclude, k)]:
        layer = key.rpartition("/")[0]
        kept[layer] = np.ones(flat[key].shape[-1], bool)
        kept[layer][pruned_filters(flat[key], amount)] = False
        bn = bn_after(layer)
        for leaf in (key, f"{layer}/bias", f"{bn}/scale", f"{bn}/bias"):
            if leaf in flat:
                flat[leaf][..., ~kept[layer]] = 0.0
    return {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}, kept


@pytest.mark.parametrize("name", list(CASES))
def test_shrunk_model_equals_zeroed_dense_model(name):
    width, exclude, bn_after = CASES[name]
    model = get_model(name, 43, width)
    variables = random_variables(model, seed=1)
    small, info = jax.jit(shrink, static_argnums=(0, 2))(model, variables, 0.4)
    reference, kept = zeroed_reference(variables, 0.4, exclude, bn_after)
    assert {p for p, before, after in info.channels if after < before} == set(kept)
    for path, before, after in info.channels:
        assert after == (int(kept[path].sum()) if path in kept else before)
    x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    got, want = jax.jit(lambda s, r, x: (shrunk_apply(model, s, x, train=False),
                                          model.apply(r, x, train=False)))(small, reference, x)
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=1e-4)
    assert info.params_after < info.params_before and info.macs_after < info.macs_before


def test_lenet_counts_by_hand():
    """LeNet-5, 43 classes, amount 0.5: conv1 6->3, conv2 16->8, fc1 120->60, fc2 84->42 filters.

    params  before 64,811; after conv1 5*5*3*3+3 = 228, conv2 5*5*3*8+8 = 608,
            fc1 (8*5*5)*60+60 = 12,060, fc2 60*42+42 = 2,562, fc3 42*43+43 = 1,849: 17,307.
    MACs    before 28*28*6*75 + 10*10*16*150 + 400*120 + 120*84 + 84*43 = 654,492; after
            28*28*3*75 + 10*10*8*75 + 200*60 + 60*42 + 42*43 = 252,726.
    """
    model = get_model("lenet5", 43)
    variables = random_variables(model, seed=0)
    small, info = shrink(model, variables, 0.5)
    assert [(p, b, a) for p, b, a in info.channels] == [
        ("conv1", 6, 3), ("conv2", 16, 8), ("fc1", 120, 60), ("fc2", 84, 42), ("fc3", 43, 43)]
    assert (info.params_before, info.params_after) == (64_811, 17_307)
    assert (info.macs_before, info.macs_after) == (654_492, 252_726)
    assert count_model_macs(model, small) == 252_726
    assert dict(info.not_pruned) == {"fc3": "its channels reach the model's output"}
    assert info.as_dict()["params_fraction"] == pytest.approx(17_307 / 64_811)
    assert small["params"]["fc1"]["kernel"].shape == (200, 60)


def test_population_vmap_and_jit_match_each_member():
    """Two members keep different filters but the same counts; vmapped and jitted equals one by one,
    and the filters are those of `structured.layer_filter_masks`."""
    model = get_model("lenet5", 43)
    members = [random_variables(model, seed) for seed in (3, 4)]
    population = jax.tree.map(lambda *a: jnp.stack(a), *members)
    small_pop, info = jax.jit(jax.vmap(lambda v: shrink(model, v, 0.5)))(population)
    x = jax.random.normal(jax.random.key(5), (3, 32, 32, 3))
    apply = jax.jit(lambda v: shrunk_apply(model, v, x))
    logits = jax.jit(jax.vmap(apply))(small_pop)
    small_pop = jax.tree.map(np.asarray, small_pop)
    for i, member in enumerate(members):
        small, member_info = shrink(model, member, 0.5)
        assert member_info == info
        jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a[i], b), small_pop, small)
        np.testing.assert_allclose(logits[i], apply(small), rtol=1e-5, atol=1e-6)
    masks = layer_filter_masks(members[0]["params"], 0.5, exclude="^fc3/")
    _, kept = zeroed_reference(members[0], 0.5, "^fc3/", lambda layer: None)
    for layer, flags in kept.items():
        np.testing.assert_array_equal(masks[layer]["kernel"].reshape(-1, flags.size)[0], flags)
    assert not np.array_equal(small_pop["params"]["conv1"]["kernel"][0],
                              small_pop["params"]["conv1"]["kernel"][1])


def test_exclude_and_shrunk_module():
    model = get_model("lenet5", 10)
    variables = random_variables(model, seed=6)
    small, info = shrink(model, variables, 0.25, exclude="^conv1/")
    assert info.channels[0] == ("conv1", 6, 6) and info.channels[1] == ("conv2", 16, 12)
    assert ("conv1", "excluded") in info.not_pruned
    x = jax.random.normal(jax.random.key(7), (2, 32, 32, 3))
    a, b, c, d = jax.jit(lambda s, v: (Shrunk(model).apply(s, x), shrunk_apply(model, s, x),
                                       shrunk_apply(model, v, x), model.apply(v, x)))(small, variables)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(c, d, rtol=1e-6)  # dense variables apply as without the interceptor


def test_bad_amounts():
    model = get_model("lenet5", 10)
    variables = random_variables(model, seed=8)
    with pytest.raises(UserError, match="removes all"):
        shrink(model, variables, 1.0)
    with pytest.raises(UserError, match="Python number"):
        shrink(model, variables, jnp.float32(0.5))


class _Mixing(nn.Module):
    """conv a feeds conv b through an offset; c's channels are summed before d; d feeds the dense
    layer e through a ReLU and a mean only; f is added to a LayerNorm's output; e is the output."""

    @nn.compact
    def __call__(self, x, train=False):
        del train
        a = nn.Conv(4, (3, 3), name="a")(x)
        b = nn.Conv(4, (3, 3), name="b")(a + 1.0)
        c = nn.Conv(4, (3, 3), name="c")(b)
        d = nn.Conv(4, (3, 3), name="d")(jnp.sum(c, axis=-1, keepdims=True) * jnp.ones(4))
        f = nn.Conv(2, (1, 1), name="f")(x) + nn.LayerNorm(name="n")(x)
        return nn.Dense(3, name="e")(jnp.concatenate([nn.relu(d), f], axis=-1).mean(axis=(1, 2)))


def test_probes_refuse_offsets_and_channel_sums():
    model = _Mixing()
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2))))
    graph = channel_graph(model, shapes, (8, 8, 2))
    reasons = dict(zip(graph.layers, graph.reasons, strict=True))
    assert reasons["a"] == "a constant is added to its channels before b (zero is not kept)"
    assert reasons["b"] is None
    assert reasons["c"] == "its channels are summed with others or mixed before d"
    assert reasons["d"] is None
    assert reasons["f"] == "its channels are summed with others or mixed before e"
    assert reasons["e"] == "its channels reach the model's output"
