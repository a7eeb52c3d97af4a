"""Carlini & Wagner L2 attack: closed-form minimal perturbations of linear models, box constraint,
confidence margin, determinism, the early stop (time to fool), populations of w8a8 LeNet-5s with
their per-member summaries, the summary against numpy, and a trained LeNet-5 against foolbox 3's
independent implementation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import softmax

from compax.errors import UserError
from compax.measure.attacks import (
    attack_population,
    attack_seconds_per_sample,
    attack_summary,
    carlini_wagner_l2,
    make_population_attack,
    next_const,
    pixel_space_apply,
    true_class_margin,
)
from compax.member_vmap import take_members
from compax.models import get_model
from compax.one_model import compress
from tests.helpers import tiny_dataset
from tests.test_ablation import random_population
from tests.test_prune import random_variables

SHAPE = (32, 32, 3)
CLASSES = 10


def linear_problem(seed, n=8):
    """Images in [0.3, 0.7], a linear classifier W, b, and its own predictions as labels."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.3, 0.7, (n, *SHAPE)).astype(np.float32)
    dim = int(np.prod(SHAPE))
    weights = (rng.normal(0, 1, (dim, CLASSES)) / np.sqrt(dim)).astype(np.float32)
    bias = rng.normal(0, 0.5, CLASSES).astype(np.float32)
    labels = (images.reshape(n, -1) @ weights + bias).argmax(-1).astype(np.int32)
    return images, weights, bias, labels


def linear_apply(weights, bias):
    return lambda x: x.reshape(x.shape[0], -1) @ weights + bias


def minimal_l2(images, weights, bias, labels, kappa):
    """Closed form without box: the nearest half-space {Z_j - Z_t >= kappa} over j != t is at
    distance min_j (Z_t - Z_j + kappa) / ||w_t - w_j||; also returns the perturbation reaching it."""
    x = images.reshape(len(images), -1).astype(np.float64)
    w, b = weights.astype(np.float64), bias.astype(np.float64)
    distances, deltas = [], []
    for xi, t in zip(x, labels, strict=True):
        z = xi @ w + b
        best = min((j for j in range(CLASSES) if j != t),
                   key=lambda j: (z[t] - z[j] + kappa) / np.linalg.norm(w[:, t] - w[:, j]))
        g = w[:, best] - w[:, t]
        distances.append((z[t] - z[best] + kappa) / np.linalg.norm(g))
        deltas.append((z[t] - z[best] + kappa) / (g @ g) * g)
    return np.array(distances), np.array(deltas)


def numpy_margin(logits, labels):
    logits = np.asarray(logits, np.float64)
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return logits[rows, labels] - others.max(-1)


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_linear_model_l2_is_close_to_the_closed_form_minimum(kappa, early_stop):
    """Also with the early stop: the first c that fools a linear model already has the boundary
    point as its optimum (the hinge makes the objective an exact penalty, see the module doc)."""
    images, weights, bias, labels = linear_problem(0)
    expected, deltas = minimal_l2(images, weights, bias, labels, kappa)
    flat = images.reshape(len(images), -1)
    assert ((flat + deltas > 0) & (flat + deltas < 1)).all()  # the box is not active at the minimum
    result = jax.tree.map(np.asarray, carlini_wagner_l2(linear_apply(weights, bias), images, labels,
                                                        confidence=kappa, early_stop=early_stop))
    assert result["success"].all()
    assert (result["l2"] >= expected * (1 - 1e-4)).all()
    assert (result["l2"] <= expected * 1.10).all()
    np.testing.assert_allclose(
        result["l2"], np.linalg.norm((result["adversarial"] - images).reshape(len(images), -1), axis=1),
        rtol=1e-5)
    margin = numpy_margin(result["adversarial"].reshape(len(images), -1) @ weights + bias, labels)
    assert (margin <= -kappa + 1e-4).all()  # misclassified by at least kappa


def test_attack_is_deterministic_and_leaves_unfoolable_samples_alone():
    images, weights, bias, labels = linear_problem(1, n=4)
    # With one search step from a tiny c the attack cannot succeed: the image comes back unchanged.
    run = functools.partial(carlini_wagner_l2, linear_apply(weights, bias), images, labels,
                            binary_search_steps=1, max_iterations=20, initial_const=1e-6)
    first, second = (jax.tree.map(np.asarray, run()) for _ in range(2))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert not first["success"].any()
    with pytest.raises(UserError, match="one true class per image"):
        carlini_wagner_l2(linear_apply(weights, bias), images, labels[:3])
    np.testing.assert_array_equal(first["adversarial"], images)
    np.testing.assert_array_equal(first["l2"], 0)
    np.testing.assert_array_equal(first["first_fooled"], -1)
    assert ((first["iterations"] >= 1) & (first["iterations"] <= 20)).all()


def test_early_stop_runs_fewer_iterations_and_counts_the_first_fooling_one():
    """Full schedule: every sample runs 5 x 100 iterations. Early stop: the same samples are fooled
    after fewer iterations (the batch's loops end early), at perturbations as small (module doc);
    a sample misclassified from the start is fooled at iteration 1 and stops there."""
    images, weights, bias, labels = linear_problem(3)
    labels = labels.copy()
    labels[0] = (labels[0] + 1) % CLASSES  # misclassified from the start
    run = jax.jit(lambda stop: carlini_wagner_l2(linear_apply(weights, bias), images, labels,
                                                 initial_const=1e-3, early_stop=stop), static_argnums=0)
    full, early = (jax.tree.map(np.asarray, run(stop)) for stop in (False, True))
    np.testing.assert_array_equal(full["iterations"], 500)
    assert early["success"].all() and full["success"].all()
    assert early["iterations"].max() < 500
    assert ((early["first_fooled"] >= 1) & (early["first_fooled"] <= early["iterations"])).all()
    assert ((full["first_fooled"] >= 1) & (full["first_fooled"] <= 500)).all()
    assert early["first_fooled"][0] == full["first_fooled"][0] == 1
    assert early["iterations"][0] <= 100  # only its first search step ran
    assert (early["l2"] <= full["l2"] * 1.10 + 1e-3).all()


@jax.jit
def _short_linear_attack(weights, bias, images, labels, kappa):
    return carlini_wagner_l2(linear_apply(weights, bias), images, labels, confidence=kappa,
                             binary_search_steps=3, max_iterations=30, initial_const=0.1)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kappa=st.floats(0.0, 1.0), shift=st.floats(-0.3, 0.3))
def test_every_success_respects_the_box_the_margin_and_the_lower_bound(seed, kappa, shift):
    images, weights, bias, labels = linear_problem(seed, n=4)
    images = np.clip(images + np.float32(shift), 0, 1)  # pixels at 0 and 1: the box is active
    labels = (images.reshape(4, -1) @ weights + bias).argmax(-1).astype(np.int32)
    result = jax.tree.map(np.asarray, _short_linear_attack(weights, bias, images, labels, kappa))
    adversarial = result["adversarial"]
    assert ((adversarial >= 0) & (adversarial <= 1)).all()
    success = result["success"]
    margin = numpy_margin(adversarial.reshape(4, -1) @ weights + bias, labels)
    assert (margin[success] <= -kappa + 1e-4).all()
    expected, _ = minimal_l2(images, weights, bias, labels, kappa)
    assert (result["l2"][success] >= expected[success] * (1 - 1e-4)).all()
    np.testing.assert_array_equal(adversarial[~success], images[~success])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), classes=st.sampled_from([2, 10, 43]))
def test_true_class_margin_matches_numpy(seed, classes):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (5, classes)).astype(np.float32)
    labels = rng.integers(0, classes, 5).astype(np.int32)
    np.testing.assert_allclose(true_class_margin(jnp.asarray(logits), jnp.asarray(labels)),
                               numpy_margin(logits, labels), rtol=1e-6, atol=1e-6)


def reference_const_update(const, lower, upper, succeeded):
    """The binary search of c in Carlini's l2_attack.py, one sample at a time."""
    const, lower, upper = list(const), list(lower), list(upper)
    for e in range(len(const)):
        if succeeded[e]:
            upper[e] = min(upper[e], const[e])
            if upper[e] < 1e9:
                const[e] = (lower[e] + upper[e]) / 2
        else:
            lower[e] = max(lower[e], const[e])
            if upper[e] < 1e9:
                const[e] = (lower[e] + upper[e]) / 2
            else:
                const[e] *= 10
    return const, lower, upper


@settings(max_examples=10, deadline=None)
@given(outcomes=st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=8),
       initial=st.floats(1e-4, 10.0))
def test_binary_search_of_c_follows_the_reference_code(outcomes, initial):
    state = (np.full(4, initial, np.float32), np.zeros(4, np.float32), np.full(4, 1e10, np.float32))
    expected = tuple(np.asarray(a, np.float64) for a in state)
    for succeeded in outcomes:
        state = jax.jit(next_const)(*state, jnp.asarray(succeeded))
        expected = reference_const_update(*expected, succeeded)
        for got, want in zip(state, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5)


MEAN, STD = np.array([0.4, 0.5, 0.6], np.float32), np.array([0.2, 0.25, 0.3], np.float32)


@pytest.fixture(scope="module")
def w8a8_lenets():
    """Two random LeNet-5s quantized to w8a8 (calibrated on random images) and one attack of both."""
    model = get_model("lenet5", CLASSES)
    rng = np.random.default_rng(0)
    calibration = ((rng.uniform(0, 1, (16, *SHAPE)) - MEAN) / STD).astype(np.float32)
    population = random_population(model, members=2, seed=0)
    # Quantized one by one and stacked: a vmapped `ptq` compiles far longer than two calls of it.
    members = [compress("w8a8", model, take_members(population, i), calibration) for i in range(2)]
    quantized = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)
    images = rng.uniform(0, 1, (4, *SHAPE)).astype(np.float32)
    first = pixel_space_apply(model, take_members(quantized, 0), MEAN, STD)
    labels = np.asarray(first(images)).argmax(-1).astype(np.int32)
    attack = make_population_attack(model, MEAN, STD, chunk=2, binary_search_steps=2, max_iterations=10,
                                    initial_const=1.0)
    return model, quantized, images, labels, attack, jax.tree.map(np.asarray, attack(quantized, images,
                                                                                      labels))


def test_w8a8_population_attack_gives_finite_results_and_matches_a_single_member(w8a8_lenets):
    model, quantized, images, labels, _, result = w8a8_lenets
    assert result["adversarial"].shape == (2, *images.shape) and result["l2"].shape == (2, 4)
    assert np.isfinite(result["adversarial"]).all() and np.isfinite(result["l2"]).all()
    assert ((result["adversarial"] >= 0) & (result["adversarial"] <= 1)).all()
    apply_first = pixel_space_apply(model, take_members(quantized, 0), MEAN, STD)
    single = jax.tree.map(np.asarray, jax.jit(functools.partial(
        carlini_wagner_l2, apply_first, binary_search_steps=2, max_iterations=10, initial_const=1.0))(
        images, labels))
    np.testing.assert_array_equal(single["success"], result["success"][0])
    np.testing.assert_allclose(single["l2"], result["l2"][0], rtol=1e-4, atol=1e-6)
    # The early stop's loops, vmapped over members, stop each member where it stops alone.
    np.testing.assert_array_equal(single["first_fooled"], result["first_fooled"][0])
    np.testing.assert_array_equal(single["iterations"], result["iterations"][0])
    summary = attack_summary(apply_first, images, labels, take_members(result, 0))
    assert summary["accuracy_before"] == 1.0
    # The straight-through gradient reaches the images: some correctly classified sample is fooled.
    assert summary["success_rate"] > 0
    assert all(np.isfinite(v) for v in summary.values())


def test_attack_population_summarises_every_member_with_mean_and_std(w8a8_lenets):
    model, quantized, images, labels, _, result = w8a8_lenets
    out = attack_population(model, quantized, MEAN, STD, images, labels, chunk=1,
                            binary_search_steps=2, max_iterations=10, initial_const=1.0)
    assert set(out) == {"members", "mean", "std", "seconds_per_image", "arrays"}
    assert len(out["members"]) == 2
    for i, summary in enumerate(out["members"]):
        apply_member = pixel_space_apply(model, take_members(quantized, i), MEAN, STD)
        expected = attack_summary(apply_member, images, labels, take_members(result, i))
        assert set(summary) == set(expected) | {"seconds_per_image"}
        assert {"mean_iterations_to_fool", "median_iterations_to_fool", "mean_iterations"} <= set(summary)
        for key, value in expected.items():
            assert summary[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
        assert 0 < summary["seconds_per_image"] < 60
    for key in out["members"][0]:
        values = np.array([m[key] for m in out["members"]], np.float64)
        finite = values[np.isfinite(values)]
        want_mean, want_std = (finite.mean(), finite.std()) if finite.size else (np.nan, np.nan)
        assert out["mean"][key] == pytest.approx(want_mean, nan_ok=True), key
        assert out["std"][key] == pytest.approx(want_std, nan_ok=True), key
    assert out["seconds_per_image"] == pytest.approx(out["mean"]["seconds_per_image"])
    for key in ("success", "first_fooled", "iterations"):
        np.testing.assert_array_equal(out["arrays"][key], result[key])
    np.testing.assert_allclose(out["arrays"]["l2"], result["l2"], rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match="unknown attack settings"):
        attack_population(model, quantized, MEAN, STD, images, labels, chunk=1, steps=10)


def test_attack_time_per_sample_is_positive(w8a8_lenets):
    _, quantized, images, labels, attack, _ = w8a8_lenets
    seconds = attack_seconds_per_sample(attack, quantized, images, labels)
    assert isinstance(seconds, float) and 0 < seconds < 60


def test_summary_matches_numpy():
    images, weights, bias, labels = linear_problem(2, n=6)
    apply_fn = linear_apply(weights, bias)
    labels = labels.copy()
    labels[0] = (labels[0] + 1) % CLASSES  # originally misclassified
    rng = np.random.default_rng(3)
    adversarial = np.clip(images + rng.normal(0, 0.2, images.shape), 0, 1).astype(np.float32)
    success = np.array([True, True, False, True, False, True])
    l2 = np.array([0.0, 1.0, 0.0, 3.0, 0.0, 2.0], np.float32)
    result = {"adversarial": adversarial, "success": success, "l2": l2}
    summary = attack_summary(apply_fn, images, labels, result)

    before = softmax((images.reshape(6, -1) @ weights + bias).astype(np.float64), axis=-1)
    after = softmax((adversarial.reshape(6, -1) @ weights + bias).astype(np.float64), axis=-1)
    rows = np.arange(6)
    assert summary["samples"] == 6
    assert summary["accuracy_before"] == pytest.approx(5 / 6)
    assert summary["accuracy_after"] == pytest.approx((after.argmax(-1) == labels).mean())
    assert summary["confidence_before"] == pytest.approx(before[rows, labels].mean(), rel=1e-5)
    assert summary["confidence_after"] == pytest.approx(after[rows, labels].mean(), rel=1e-5)
    assert summary["success_rate"] == pytest.approx(3 / 5)  # sample 0 does not count
    assert summary["mean_l2"] == pytest.approx(2.0)
    assert summary["median_l2"] == pytest.approx(2.0)

    with pytest.raises(UserError, match="does not match images"):
        attack_summary(apply_fn, images[:5], labels[:5], result)

    assert "mean_iterations_to_fool" not in summary  # a result without the counts
    counts = {**result, "first_fooled": np.array([1, 7, -1, 30, -1, 9], np.int32),
              "iterations": np.array([10, 20, 500, 40, 500, 60], np.int32)}
    summary = attack_summary(apply_fn, images, labels, counts)
    assert summary["mean_iterations_to_fool"] == pytest.approx((7 + 30 + 9) / 3)  # fooled samples
    assert summary["median_iterations_to_fool"] == pytest.approx(9)
    assert summary["mean_iterations"] == pytest.approx(1130 / 6)


# The cross-check's settings, on both sides: Carlini & Wagner's binary search, Adam, kappa = 1.
CROSS_CHECK = {"binary_search_steps": 5, "max_iterations": 100, "learning_rate": 0.01,
               "initial_const": 1e-2, "confidence": 1.0}
CROSS_CHECK_IMAGES = 16


@pytest.fixture(scope="module")
def trained_lenet():
    """A float LeNet-5 trained for 150 Adam steps on `tiny_dataset` (4 classes, test accuracy 1.0),
    its pixel-space apply, and 16 test images in [0, 1] with their labels (for foolbox only: skipped,
    untrained, without it)."""
    pytest.importorskip("foolbox")
    dataset = tiny_dataset()
    model = get_model("lenet5", dataset.num_classes)
    variables = random_variables(model, 0)
    x = (dataset.train.images / 255.0 - dataset.mean) / dataset.std
    y = dataset.train.labels
    optimizer = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss(params):
            logits = model.apply({**variables, "params": params}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = variables["params"], optimizer.init(variables["params"])
    rng = np.random.default_rng(0)
    for _ in range(150):
        batch = rng.choice(len(y), 32, replace=False)
        params, opt_state = step(params, opt_state, jnp.asarray(x[batch], jnp.float32), y[batch])
    apply_fn = jax.jit(pixel_space_apply(model, compress("float32", model, {**variables, "params": params}),
                                         dataset.mean, dataset.std))
    images = (dataset.test.images[:CROSS_CHECK_IMAGES] / 255.0).astype(np.float32)
    return apply_fn, images, dataset.test.labels[:CROSS_CHECK_IMAGES]


def test_float_lenet_attack_agrees_with_foolbox(trained_lenet):
    """compax's attack against foolbox 3's `L2CarliniWagnerAttack` (run on JAX through EagerPy) on
    the same trained float LeNet-5, images and settings (`CROSS_CHECK`; foolbox with its default
    early abort: a batch-wide stall test, and it bisects c to the end).

    Tolerances. Full schedule (`early_stop=False`): the same algorithm, so the same samples succeed
    and each L2 agrees within 5% (measured: within 1%; foolbox's batch-wide abort and XLA's jitted
    against EagerPy's op-by-op float rounding move the iterates slightly), the median within 2%.
    Early stop: it keeps the first c that fools a sample instead of bisecting further, so its L2 is
    at least foolbox's (2% slack) and the median at most 10% above it (measured: +1.3%, single
    images up to +46%); the success rate at most one image (1/16) apart (measured: both 1.0),
    since both try the same c's until a sample is first fooled."""
    foolbox = pytest.importorskip("foolbox")
    apply_fn, images, labels = trained_lenet
    n, kappa = len(labels), CROSS_CHECK["confidence"]
    attack = foolbox.attacks.L2CarliniWagnerAttack(
        binary_search_steps=CROSS_CHECK["binary_search_steps"], steps=CROSS_CHECK["max_iterations"],
        stepsize=CROSS_CHECK["learning_rate"], confidence=kappa,
        initial_const=CROSS_CHECK["initial_const"], abort_early=True)
    theirs = np.asarray(attack.run(foolbox.JAXModel(apply_fn, bounds=(0, 1)), jnp.asarray(images),
                                   jnp.asarray(labels)))
    their_success = np.any(theirs.reshape(n, -1) != 0, axis=1)  # foolbox leaves zeros on failure
    their_l2 = np.linalg.norm((theirs - images).reshape(n, -1), axis=1)
    assert (numpy_margin(apply_fn(theirs[their_success]), labels[their_success]) < -kappa).all()

    run = jax.jit(lambda stop: carlini_wagner_l2(apply_fn, images, labels, early_stop=stop, **CROSS_CHECK),
                  static_argnums=0)
    full, early = (jax.tree.map(np.asarray, run(stop)) for stop in (False, True))
    assert (np.asarray(apply_fn(images)).argmax(-1) == labels).all()
    their_median = np.median(their_l2[their_success])

    np.testing.assert_array_equal(full["success"], their_success)
    np.testing.assert_allclose(full["l2"], np.where(their_success, their_l2, 0), rtol=0.05)
    assert np.median(full["l2"][full["success"]]) == pytest.approx(their_median, rel=0.02)

    assert abs(early["success"].mean() - their_success.mean()) <= 1 / n
    both = early["success"] & their_success
    assert (early["l2"][both] >= their_l2[both] * 0.98).all()
    early_median = np.median(early["l2"][early["success"]])
    assert their_median * 0.98 <= early_median <= their_median * 1.10
    assert early["iterations"].mean() < full["iterations"].mean() / 2  # the point of stopping early
