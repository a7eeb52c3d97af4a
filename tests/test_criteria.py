"""Pruning criteria as scores: the shared selection against NumPy, each criterion against an
independent reference (torch's L1 masks, PyTorch autograd), and amount=searched per criterion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compax.compress import Compressed, apply_masks, global_l1_masks, layer_l1_masks
from compax.compress.methods.gradient_prune import GradientMagnitude
from compax.compress.methods.random_prune import RandomPruning
from compax.compress.methods.snip import Snip
from compax.compress.methods.unstructured import GlobalL1, LayerL1
from compax.compress.paths import weight_leaves
from compax.compress.registry import Context, Variant
from compax.compress.selection import select_masks
from compax.errors import UserError
from compax.models import get_model
from tests.test_prune import FROM_TORCH, masks_list, random_variables

LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


@pytest.fixture(scope="module")
def lenet():
    model = get_model("lenet5", 43)
    return model, random_variables(model, 0)


def population(model, seeds):
    members = [random_variables(model, s) for s in seeds]
    return jax.tree.map(lambda *a: jnp.stack(a), *members)


def numpy_selection(scores: dict, amount: float, scope: str, exclude=()) -> dict:
    """{layer: pruned flags} from per-layer score arrays: a stable argsort, lowest first."""
    layers = [n for n in LAYERS if n not in exclude]

    def lowest(arrays, k):
        flat = np.concatenate([a.ravel() for a in arrays])
        flags = np.zeros(flat.size, bool)
        flags[np.argsort(flat, kind="stable")[:k]] = True
        return np.split(flags, np.cumsum([a.size for a in arrays])[:-1])

    if scope in ("global", "layer"):
        arrays = [scores[n] for n in layers]
        groups = [arrays] if scope == "global" else [[a] for a in arrays]
        flags = [f for g in groups for f in lowest(g, round(amount * sum(a.size for a in g)))]
        return {n: f.reshape(scores[n].shape) for n, f in zip(layers, flags, strict=True)}
    channels = [scores[n].reshape(-1, scores[n].shape[-1]).sum(0, dtype=np.float32) for n in layers]
    if scope == "global_filter":
        channels = [c / (scores[n].size // c.size) for n, c in zip(layers, channels, strict=True)]
        flags = lowest(channels, round(amount * sum(c.size for c in channels)))
    else:
        flags = [lowest([c], round(amount * c.size))[0] for c in channels]
    return {n: np.broadcast_to(f, scores[n].shape) for n, f in zip(layers, flags, strict=True)}


def pruned_by_layer(masks) -> dict:
    return {n: ~np.asarray(masks[n]["kernel"]) for n in LAYERS if masks[n]["kernel"] is not None}


@pytest.mark.parametrize("scope", ["global", "layer", "filter", "global_filter"])
def test_selection_exact_counts_ties_and_exclusions(lenet, scope):
    _, variables = lenet
    rng = np.random.default_rng(3)  # scores in {0, 1, 2, 3}: ties everywhere
    scores = jax.tree.map(lambda a: jnp.asarray(rng.integers(0, 4, a.shape), jnp.float32),
                          variables["params"])
    plain = {n: np.asarray(scores[n]["kernel"]) for n in LAYERS}
    for amount, exclude in ((0.37, None), (0.8, "^(conv1|fc3)/")):
        masks = select_masks(scores, amount, scope=scope, exclude=exclude)
        excluded = ("conv1", "fc3") if exclude else ()
        want = numpy_selection(plain, amount, scope, excluded)
        got = pruned_by_layer(masks)
        assert set(got) == set(want)
        for n in want:
            np.testing.assert_array_equal(got[n], want[n], err_msg=f"{scope} {n}")


def test_selection_rejects_bad_scope(lenet):
    with pytest.raises(UserError, match="scope must be one of"):
        select_masks(lenet[1]["params"], 0.5, scope="channel")
    with pytest.raises(UserError, match="scope must be one of"):
        RandomPruning(amount=0.5, scope="rows")


def run_step(step, model, variables, **context):
    ctx = Context(**context)
    variant = step(Variant(model, Compressed(variables, None)), ctx)
    return variant


def member_masks(variant, variables, i):
    """Member i's pruned flags per layer: entries the step set to zero."""
    return {n: np.asarray(variant.compressed.variables["params"][n]["kernel"][i] == 0)
            & (np.asarray(variables["params"][n]["kernel"][i]) != 0) for n in LAYERS}


def test_magnitude_criteria_equal_the_l1_masks_bit_for_bit(lenet):
    model, variables = lenet
    params = variables["params"]
    for step, reference in ((GlobalL1(amount=0.55), global_l1_masks),
                            (LayerL1(amount=0.55, exclude="^fc3/"), layer_l1_masks)):
        ours = step.member_masks(model, variables, 0, step.inputs(Context()), 0.55)
        theirs = reference(params, 0.55, exclude=step.exclude)
        for a, b in zip(masks_list(ours), masks_list(theirs), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert ours["fc3"]["kernel"] is None if step.exclude else True


def test_random_exact_counts_members_differ_seed_repeats(lenet):
    model, _ = lenet
    variables = population(model, (1, 2, 3))
    step = RandomPruning(amount=0.3, scope="layer")
    first = run_step(step, model, variables, seed=5)
    again = run_step(step, model, variables, seed=5)
    other = run_step(step, model, variables, seed=6)
    masks = [member_masks(first, variables, i) for i in range(3)]
    for m in masks:
        for n in LAYERS:
            assert m[n].sum() == round(0.3 * m[n].size), n
    assert not np.array_equal(masks[0]["fc1"], masks[1]["fc1"])
    for i in range(3):
        for n in LAYERS:
            np.testing.assert_array_equal(member_masks(again, variables, i)[n], masks[i][n])
    assert not np.array_equal(member_masks(other, variables, 0)["fc1"], masks[0]["fc1"])
    assert first.info["sparsity"]["amount"] == 0.3


def torch_taylor_scores(model, params, images, labels) -> dict:
    """{layer: |w · ∂L/∂w|} from PyTorch autograd on the twin, in flax layout."""
    torch = pytest.importorskip("torch")
    from torch_reference.models import torch_twin

    net = torch_twin(model, params)
    logits = net(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(labels, np.int64))).backward()
    scores = {}
    for n in LAYERS:
        weight = getattr(net, n).weight
        score = (weight * weight.grad).abs().detach().numpy()
        scores[n] = score.transpose(FROM_TORCH[score.ndim])
    return scores


@pytest.mark.torch
def test_gradient_criteria_scores_equal_torch_autograd(lenet):
    model, variables = lenet
    rng = np.random.default_rng(7)
    images = jnp.asarray(rng.normal(size=(40, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 43, 40), jnp.int32)
    ctx = Context(calib_images=images, calib_labels=labels)
    index = np.arange(16) * 40 // 16  # the batch: 16 images evenly spread through the 40
    want = torch_taylor_scores(model, variables["params"], images[index], labels[index])
    total = sum(float(w.sum(dtype=np.float64)) for w in want.values())
    for step, scale in ((GradientMagnitude(amount=0.5, batch=16), 1.0),
                        (Snip(amount=0.5, batch=16), total)):
        shared = step.inputs(ctx)
        scores = step.member_scores(model, variables, 0, shared)
        for n in LAYERS:
            got = np.asarray(scores[n]["kernel"]) * scale
            np.testing.assert_allclose(got, want[n], rtol=2e-4, atol=1e-6 * want[n].max(),
                                       err_msg=f"{step.name} {n}")
        # the masks are the shared selection of those scores
        plain = {n: np.asarray(scores[n]["kernel"]) for n in LAYERS}
        masks = step.member_masks(model, variables, 0, shared, 0.5)
        for n, flags in numpy_selection(plain, 0.5, "global").items():
            np.testing.assert_array_equal(pruned_by_layer(masks)[n], flags)


def test_gradient_criteria_need_labelled_calibration_data(lenet):
    model, variables = lenet
    batched = jax.tree.map(lambda a: a[None], variables)
    with pytest.raises(UserError, match="needs labelled calibration images"):
        run_step(GradientMagnitude(amount=0.5), model, batched)
    with pytest.raises(UserError, match="batch=128 exceeds the 8 calibration images"):
        run_step(Snip(amount=0.5), model, batched, calib_images=jnp.zeros((8, 32, 32, 3)),
                 calib_labels=jnp.zeros(8, jnp.int32))
    with pytest.raises(UserError, match="batch must be an integer"):
        Snip(amount=0.5, batch=0)


def test_searched_amount_searches_the_steps_own_criterion():
    from compax.compress_population import recipe_context
    from compax.data import normalize
    from tests.helpers import tiny_config, tiny_dataset

    dataset = tiny_dataset()
    config = tiny_config()
    config.compress.sparsity_step = 0.25
    model = get_model("lenet5", dataset.num_classes)
    variables = population(model, (11, 12))
    ctx = recipe_context(config, model, variables, dataset, chunk=2)
    layer = LayerL1(exclude=None)
    variant = layer(Variant(model, Compressed(variables, None)), ctx)
    ctx.searched_sparsity(GlobalL1(exclude=None))
    gradient = GradientMagnitude(exclude="^fc3/", batch=16)
    assert ctx.searched_sparsity(gradient) in (0.0, 0.25, 0.5, 0.75)
    searches = ctx.cache["sparsity_searches"]
    assert set(searches) == {"l1_layer(exclude=None)", "l1_global(exclude=None)",
                             "grad_magnitude(exclude=^fc3/,scope=global,batch=16)"}
    search = searches["l1_layer(exclude=None)"]
    assert variant.info["sparsity"]["amount"] == search["chosen"]
    assert search["levels"] == [0.25, 0.5, 0.75]
    # the curve is per-layer L1's own: each level pruned with layer_l1_masks, evaluated
    x = normalize(dataset.val.images, dataset.mean, dataset.std)
    for level, acc in zip(search["levels"], search["val_accuracy"], strict=True):
        accs = []
        for i in range(2):
            v = jax.tree.map(lambda a, i=i: a[i], variables)
            pruned = apply_masks(v["params"], layer_l1_masks(v["params"], level))
            logits = model.apply({**v, "params": pruned}, x, train=False)
            accs.append(np.mean(np.argmax(logits, -1) == dataset.val.labels))
        assert acc == pytest.approx(np.mean(accs), abs=1e-6)
    for n, w in weight_leaves(variant.compressed.variables["params"]):  # every layer alike
        share = float(np.mean(np.asarray(w) == 0))
        assert abs(share - search["chosen"]) < 0.01, n
