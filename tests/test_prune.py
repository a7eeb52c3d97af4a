"""Pruning: global L1 masks against torch.nn.utils.prune and a NumPy reference, sweeps, reports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compax.compress import (
    apply_masks,
    global_filter_masks,
    global_l1_masks,
    layer_filter_masks,
    level_masks,
    num_to_prune,
    select_max_sparsity,
    sparsity_report,
    sparsity_sweep,
)
from compax.compress.paths import weight_leaves
from compax.compress.prune import lowest_k
from compax.errors import UserError
from compax.models import get_model, init_variables

# flax kernel layout -> torch weight layout: conv (kh, kw, in, out) -> (out, in, kh, kw),
# dense (in, out) -> (out, in).
TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}
FROM_TORCH = {4: (2, 3, 1, 0), 2: (1, 0)}


def random_variables(model, seed: int):
    """Variables of `model` drawn with NumPy (no XLA compilation): kernels U(+-1/sqrt(fan_in)),
    biases U(+-0.1), BatchNorm scale and running variance 1, offsets and means 0."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            bound = 1 / np.sqrt(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)
        if name == "bias":
            return jnp.asarray(rng.uniform(-0.1, 0.1, leaf.shape), leaf.dtype)
        return (jnp.ones if name in ("scale", "var") else jnp.zeros)(leaf.shape, leaf.dtype)

    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def lenet():
    model = get_model("lenet5", 43)
    return model, random_variables(model, 0)


def masks_list(masks):
    """The boolean masks of a mask pytree, in flattening order."""
    return [m for m in jax.tree.leaves(masks, is_leaf=lambda m: m is None) if m is not None]


def stable_lowest_k(arrays, k):
    """NumPy reference of the tie rule: stable argsort of the concatenation, first k pruned."""
    flat = np.concatenate([a.ravel() for a in arrays])
    marked = np.zeros(flat.size, bool)
    marked[np.argsort(flat, kind="stable")[:max(k, 0)]] = True
    return np.split(marked, np.cumsum([a.size for a in arrays])[:-1])


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 1), st.integers(1, 20_000_000))
def test_num_to_prune_is_pythons_round_half_even(amount, total):
    assert num_to_prune(amount, total) == round(amount * total)


def test_num_to_prune_counts_and_bad_amounts():
    assert num_to_prune(7, 10) == 7
    assert num_to_prune(0.25, 10) == 2  # round(2.5) = 2, half to even like torch
    assert int(num_to_prune(jnp.int32(3), 10)) == 3
    assert int(num_to_prune(jnp.float32(0.5), 10)) == 5
    for bad in (1.5, -0.1, 11, -1, True):
        with pytest.raises(UserError):
            num_to_prune(bad, 10)


SHAPES = ((7,), (3, 4), (2, 1, 3))


@settings(max_examples=80, deadline=None)
@given(st.tuples(*[st.lists(st.integers(0, 4), min_size=int(np.prod(s)), max_size=int(np.prod(s)))
                   for s in SHAPES]), st.integers(-2, 27))
def test_lowest_k_prunes_ties_by_lower_flat_index(values, k):
    arrays = [np.asarray(v, np.float32).reshape(s) for v, s in zip(values, SHAPES, strict=True)]
    got = lowest_k([jnp.asarray(a) for a in arrays], k)
    for g, want in zip(got, stable_lowest_k(arrays, k), strict=True):
        np.testing.assert_array_equal(np.asarray(g), want.reshape(g.shape))


def test_lowest_k_on_real_valued_weights_matches_numpy():
    rng = np.random.default_rng(1)
    arrays = [np.abs(rng.normal(size=s)).astype(np.float32) for s in [(5, 5, 3, 6), (400, 120)]]
    for k in (0, 1, 12345, 48450, 48451):
        got = lowest_k([jnp.asarray(a) for a in arrays], k)
        for g, want in zip(got, stable_lowest_k(arrays, k), strict=True):
            np.testing.assert_array_equal(np.asarray(g), want.reshape(g.shape))


@pytest.mark.torch
@pytest.mark.parametrize("amount", [0.0, 0.1, 0.55, 0.9, 1.0, 12_345])
def test_global_masks_equal_torch_global_unstructured(lenet, amount):
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune

    _, variables = lenet
    weights = weight_leaves(variables["params"])
    assert [p for p, _ in weights] == [f"{n}/kernel" for n in ("conv1", "conv2", "fc1", "fc2",
                                                               "fc3")]
    modules = []
    for _, w in weights:  # the same order in torch's parameter list
        module = torch.nn.Module()
        w = np.ascontiguousarray(np.asarray(w).transpose(TO_TORCH[w.ndim]))
        module.weight = torch.nn.Parameter(torch.from_numpy(w))
        modules.append(module)
    prune.global_unstructured([(m, "weight") for m in modules],
                              pruning_method=prune.L1Unstructured, amount=amount)
    masks = global_l1_masks(variables["params"], amount)
    ours = dict(zip([p for p, _ in weights], masks_list(masks), strict=True))
    for (path, w), module in zip(weights, modules, strict=True):
        theirs = module.weight_mask.numpy().astype(bool).transpose(FROM_TORCH[w.ndim])
        np.testing.assert_array_equal(np.asarray(ours[path]), theirs)


def test_masks_keep_biases_and_excluded_layers(lenet):
    _, variables = lenet
    params = variables["params"]
    masks = global_l1_masks(params, 0.5, exclude="^conv1/")
    assert masks["conv1"]["kernel"] is None and masks["fc1"]["bias"] is None
    prunable = sum(w.size for _, w in weight_leaves(params, "^conv1/"))
    pruned = sum(int(np.sum(~np.asarray(m))) for m in masks_list(masks))
    assert pruned == round(0.5 * prunable)
    kept = apply_masks(params, masks)
    np.testing.assert_array_equal(kept["conv1"]["kernel"], params["conv1"]["kernel"])
    np.testing.assert_array_equal(kept["fc1"]["bias"], params["fc1"]["bias"])
    fc1 = np.asarray(kept["fc1"]["kernel"])
    np.testing.assert_array_equal(fc1 == 0, ~np.asarray(masks["fc1"]["kernel"]))
    with pytest.raises(UserError):
        global_l1_masks(params, 0.5, exclude="(")


def test_masks_vmap_over_population_and_traced_levels(lenet):
    model, _ = lenet
    members = [random_variables(model, seed)["params"] for seed in (1, 2, 3)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *members)
    batched = jax.jit(jax.vmap(global_l1_masks, in_axes=(0, None)))(params, 0.7)
    one = jax.jit(global_l1_masks, static_argnames="amount")
    for i in range(3):
        member = one(jax.tree.map(lambda a, i=i: a[i], params), amount=0.7)
        for b, m in zip(masks_list(batched), masks_list(member), strict=True):
            np.testing.assert_array_equal(np.asarray(b)[i], np.asarray(m))
    first = jax.tree.map(lambda a: a[0], params)
    levels = jnp.asarray([0.25, 0.5, 0.75], jnp.float32)
    swept = jax.vmap(lambda a: global_l1_masks(first, a))(levels)
    stacked = level_masks(first, (0.25, 0.5, 0.75))
    for a, b in zip(masks_list(swept), masks_list(stacked), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sparsity_report_reproduces_the_studys_lenet_figure(lenet):
    _, variables = lenet
    report = sparsity_report(variables["params"], global_l1_masks(variables["params"], 0.55))
    assert report["weights"] == 64_542 and report["params"] == 64_811
    assert report["pruned"] == round(0.55 * 64_542) == 35_498
    assert round(100 * report["fraction_of_params"], 2) == 54.77
    assert report["fraction_of_weights"] == pytest.approx(35_498 / 64_542)
    assert set(report["layers"]) == {f"{n}/kernel" for n in ("conv1", "conv2", "fc1", "fc2", "fc3")}


@pytest.mark.torch
@pytest.mark.parametrize("amount", [0.3, 0.5])
def test_layer_filter_masks_equal_torch_ln_structured(lenet, amount):
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune

    _, variables = lenet
    masks = layer_filter_masks(variables["params"], amount)
    for path, w in weight_leaves(variables["params"]):
        module = torch.nn.Module()
        t = np.ascontiguousarray(np.asarray(w).transpose(TO_TORCH[w.ndim]))
        module.weight = torch.nn.Parameter(torch.from_numpy(t))
        prune.ln_structured(module, "weight", amount=amount, n=1, dim=0)
        theirs = module.weight_mask.numpy().astype(bool).transpose(FROM_TORCH[w.ndim])
        layer = path.split("/")[0]
        np.testing.assert_array_equal(np.asarray(masks[layer]["kernel"]), theirs)


def test_global_filter_masks_prune_lowest_mean_magnitude_channels(lenet):
    _, variables = lenet
    weights = weight_leaves(variables["params"])
    masks = global_filter_masks(variables["params"], 0.4)
    scores = np.concatenate([np.abs(np.asarray(w)).reshape(-1, w.shape[-1]).mean(0)
                             for _, w in weights])
    pruned = np.zeros(scores.size, bool)
    pruned[np.argsort(scores, kind="stable")[:round(0.4 * scores.size)]] = True
    got = np.concatenate([~np.asarray(masks[p.split("/")[0]]["kernel"]).reshape(-1, w.shape[-1])[0]
                          for p, w in weights])
    np.testing.assert_array_equal(got, pruned)
    for p, w in weights:  # whole output channels
        m = np.asarray(masks[p.split("/")[0]]["kernel"]).reshape(-1, w.shape[-1])
        assert (m == m[:1]).all()


def test_sweep_equals_evaluating_each_level_and_selection(lenet):
    model, variables = lenet
    images = jax.random.normal(jax.random.key(4), (64, 32, 32, 3))
    labels = jnp.argmax(model.apply(variables, images), -1)

    @jax.jit
    def accuracy(params):
        return jnp.mean(jnp.argmax(model.apply({"params": params}, images), -1) == labels)

    levels = (0.0, 0.3, 0.6, 0.9)
    swept = sparsity_sweep(variables["params"], levels, accuracy, batch_size=2)
    for level, acc in zip(levels, np.asarray(swept), strict=True):
        masks = global_l1_masks(variables["params"], level)
        assert acc == pytest.approx(float(accuracy(apply_masks(variables["params"], masks))))
    assert swept[0] == 1.0
    assert select_max_sparsity(levels, [1.0, 0.995, 0.99, 0.5], 1.0) == 0.6
    assert select_max_sparsity(levels, [0.9, 0.5, 0.95, 0.2], 1.0, tolerance_pp=5) == 0.6
    assert select_max_sparsity(levels, [0.8, 0.5, 0.5, 0.2], 1.0) == 0.0
    with pytest.raises(UserError):
        select_max_sparsity(levels, [99.0, 98.0, 97.0, 50.0], 99.0)
