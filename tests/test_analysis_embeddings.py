"""Penultimate features against flax's captured intermediates, t-SNE determinism, silhouette against a
NumPy loop, and class selection properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compax.errors import UserError
from compax.measure.embeddings import (
    cluster_separation,
    penultimate_features,
    select_classes,
    tsne_embedding,
)
from compax.measure.taps import apply_with_taps
from compax.member_vmap import chunked_vmap
from compax.models import get_model
from compax.one_model import compress
from tests.test_analysis_saliency import N, lenet_setup
from tests.test_prune import random_variables


@pytest.fixture(scope="module")
def lenet():
    return lenet_setup()


def captured_output(model, variables, x, module: str):
    """Output of a top-level module's __call__, from flax's `capture_intermediates`."""
    _, state = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                                mutable=["intermediates"]))(variables, x)
    return state["intermediates"][module]["__call__"][0]


def test_lenet_features_are_the_rectified_fc2_output(lenet):
    model, variables, float32, _, x, _ = lenet
    features = jax.jit(penultimate_features, static_argnums=(0, 3))(model, float32, x, 4)
    want = jax.nn.relu(captured_output(model, variables, x, "fc2"))
    assert features.shape == (N, 84)
    np.testing.assert_allclose(features, want, atol=1e-5)


def test_squeezenet_features_are_the_spatial_mean_of_the_last_fire_module():
    model = get_model("squeezenet", 10, 0.125)
    variables = random_variables(model, 0)
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    float32 = compress("float32", model, variables)
    features = jax.jit(penultimate_features, static_argnums=0)(model, float32, x)
    want = jnp.mean(captured_output(model, variables, x, "fire8"), axis=(1, 2))
    assert features.shape == (3, 64)
    np.testing.assert_allclose(features, want, atol=1e-5)


def test_quantized_features_batch_and_vmap_over_a_population(lenet):
    model, _, _, w8a8, x, _ = lenet
    features = jax.jit(penultimate_features, static_argnums=(0, 3))(model, w8a8, x, 4)  # 4 + 2 padded
    whole = jax.jit(apply_with_taps, static_argnums=0)(model, w8a8, x)[1]["features"]
    np.testing.assert_allclose(features, whole, atol=1e-6)
    # fc3's input is on the grid of its quantization point (fc2 + ReLU, point 4)
    codes = np.asarray(features) / float(w8a8.qstate.activation_scale[4])
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    population = jax.tree.map(lambda *a: jnp.stack(a), w8a8, lenet_setup(seed=1)[3])
    batched = chunked_vmap(lambda c, x: penultimate_features(model, c, x), 2, 1)(population, x)
    assert batched.shape == (2, N, 84)
    np.testing.assert_allclose(batched[0], whole, atol=1e-5)


def blobs(seed, classes=3, per_class=30, dim=10, spread=0.1):
    """Gaussian clusters around well separated centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 10
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_tsne_is_deterministic_for_a_seed_and_keeps_clusters():
    features, labels = blobs(0)
    first = tsne_embedding(features, seed=3, perplexity=10.0)
    assert first.shape == (90, 2) and first.dtype == np.float32
    np.testing.assert_array_equal(first, tsne_embedding(features, seed=3, perplexity=10.0))
    assert cluster_separation(first, labels) > 0.8
    with pytest.raises(UserError, match="perplexity"):
        tsne_embedding(features[:5], seed=0)


def loop_silhouette(points, labels):
    """Rousseeuw's silhouette, mean over samples, with explicit loops."""
    scores = []
    for i, (p, c) in enumerate(zip(points, labels, strict=True)):
        distances = {k: [] for k in np.unique(labels)}
        for j, (q, k) in enumerate(zip(points, labels, strict=True)):
            if j != i:
                distances[k].append(np.sqrt(np.sum((p - q) ** 2)))
        if not distances[c]:
            scores.append(0.0)
            continue
        a = np.mean(distances[c])
        b = min(np.mean(d) for k, d in distances.items() if k != c)
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def test_cluster_separation_matches_loop_and_is_near_one_for_separated_clusters():
    features, labels = blobs(1, per_class=12, spread=3.0)
    assert cluster_separation(features, labels) == pytest.approx(loop_silhouette(features, labels), abs=1e-9)
    separated, labels = blobs(2, per_class=12, spread=0.01)
    assert cluster_separation(separated, labels) > 0.99
    mixed = np.random.default_rng(0).normal(size=(36, 4))
    assert abs(cluster_separation(mixed, labels)) < 0.2
    with pytest.raises(UserError, match="classes"):
        cluster_separation(features, np.zeros(len(features)))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), per_class=st.integers(1, 5),
       classes=st.lists(st.integers(0, 42), min_size=1, max_size=5, unique=True))
def test_select_classes_draws_distinct_samples_of_the_chosen_classes(seed, per_class, classes):
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(43), 6))
    chosen = select_classes(labels, classes, per_class, seed)
    assert len(chosen) == len(set(chosen.tolist())) == per_class * len(classes)
    np.testing.assert_array_equal(labels[chosen], np.repeat(classes, per_class))
    np.testing.assert_array_equal(chosen, select_classes(labels, classes, per_class, seed))
    with pytest.raises(UserError, match="per_class"):
        select_classes(labels, classes, 7, seed)
