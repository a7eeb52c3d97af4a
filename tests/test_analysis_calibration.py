"""Target confidence, confidence change and calibration error against NumPy loops and torch."""

import functools
import types

import jax
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compax.analyses.calibration import Calibration
from compax.analyses.reference import Compared
from compax.errors import UserError
from compax.measure.calibration import (
    QUANTILE_LEVELS,
    calibration_bins,
    confidence_bins,
    confidence_change,
    expected_calibration_error,
    maximum_calibration_error,
    target_confidence,
)

C = 43
N = 2000
M = 15


@pytest.fixture(scope="module")
def logits():
    """Two models' logits for the same labels: the compressed ones are the original plus noise."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, N).astype(np.int32)
    original = rng.normal(0, 2, (N, C)).astype(np.float32)
    original[np.arange(N), labels] += rng.uniform(0, 8, N).astype(np.float32)
    compressed = (original + rng.normal(0, 1.5, (N, C))).astype(np.float32)
    return labels, original, compressed


def numpy_softmax(logits):
    z = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def loop_bins(confidences, correct, num_bins):
    """Guo et al.'s bins by explicit comparisons lower < c <= upper; c = 0 counts in bin 0."""
    edges = (np.arange(num_bins + 1) / num_bins).astype(np.float32)
    count, conf, acc = np.zeros(num_bins, int), np.zeros(num_bins), np.zeros(num_bins)
    for c, ok in zip(confidences, correct, strict=True):
        for b in range(num_bins):
            if edges[b] < c <= edges[b + 1] or (b == 0 and c == 0):
                count[b] += 1
                conf[b] += c
                acc[b] += ok
                break
    filled = count > 0
    conf[filled] /= count[filled]
    acc[filled] /= count[filled]
    return count, conf, acc


def loop_calibration_errors(logits, labels, num_bins):
    probabilities = numpy_softmax(logits).astype(np.float32)
    count, conf, acc = loop_bins(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, num_bins)
    gaps = np.abs(acc - conf)
    return float((count / count.sum() * gaps).sum()), float(gaps[count > 0].max())


def test_target_confidence_matches_numpy(logits):
    labels, original, _ = logits
    expected = numpy_softmax(original)[np.arange(N), labels]
    np.testing.assert_allclose(target_confidence(original, labels), expected, rtol=1e-5, atol=1e-7)


def test_confidence_change_matches_numpy(logits):
    labels, original, compressed = logits
    result = confidence_change(original, compressed, labels)
    diff = numpy_softmax(compressed)[np.arange(N), labels] - numpy_softmax(original)[np.arange(N), labels]
    same = original.argmax(axis=1) == compressed.argmax(axis=1)
    np.testing.assert_allclose(result["diff"], diff, atol=1e-6)
    np.testing.assert_array_equal(result["same_prediction"], same)
    assert 0 < same.sum() < N
    for group, mask in (("all", np.ones(N, bool)), ("same", same), ("different", ~same)):
        summary, values = result[group], diff[mask]
        assert int(summary["count"]) == mask.sum()
        np.testing.assert_allclose(summary["mean"], values.mean(), atol=1e-6)
        np.testing.assert_allclose(summary["std"], values.std(), atol=1e-6)
        np.testing.assert_allclose(summary["quantiles"], np.quantile(values, QUANTILE_LEVELS), atol=1e-6)
        np.testing.assert_allclose(summary["share_large_change"], np.mean(np.abs(values) > 0.1), atol=1e-6)
    # the study's observation on this synthetic pair: changed predictions change confidence more
    assert result["different"]["share_large_change"] > result["same"]["share_large_change"]


def test_confidence_change_of_identical_models_has_an_empty_group(logits):
    labels, original, _ = logits
    result = confidence_change(original, original, labels, quantile_levels=(0.5,), large_change=0.2)
    assert not np.asarray(result["diff"]).any()
    assert int(result["same"]["count"]) == N and float(result["same"]["share_large_change"]) == 0
    assert int(result["different"]["count"]) == 0
    for key in ("mean", "std", "quantiles", "share_large_change"):
        assert np.isnan(np.asarray(result["different"][key])).all(), key


def test_ece_and_mce_match_a_numpy_loop(logits):
    labels, original, _ = logits
    ece, mce = loop_calibration_errors(original, labels, M)
    np.testing.assert_allclose(expected_calibration_error(original, labels, M), ece, atol=1e-6)
    np.testing.assert_allclose(maximum_calibration_error(original, labels, M), mce, atol=1e-6)
    probabilities = numpy_softmax(original).astype(np.float32)
    count, conf, acc = loop_bins(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, M)
    bins = calibration_bins(original, labels, M)
    np.testing.assert_array_equal(bins["count"], count)
    np.testing.assert_allclose(bins["confidence"], conf, atol=1e-6)
    np.testing.assert_allclose(bins["accuracy"], acc, atol=1e-6)
    assert count.sum() == N and (count == 0).any()  # some low-confidence bins are empty


def test_the_calibration_analysis_reports_each_members_mce(logits):
    labels, original, compressed = logits
    members = (np.stack([original, 0.5 * original]), np.stack([compressed, 3.0 * compressed]))
    ref = types.SimpleNamespace(labels=labels, logits=members[0])
    analysis = Calibration(ml_collections.ConfigDict({"bins": M}))
    analysis.prepare(ref)
    baseline, _ = analysis.baseline(ref)
    results, _ = analysis.compare(ref, Compared("compressed", None, None, members[1]))
    mce = [np.array([maximum_calibration_error(z, labels, M) for z in population])
           for population in members]
    assert len(set(mce[0].tolist() + mce[1].tolist())) == 4  # four different members
    np.testing.assert_allclose([baseline["mce"], baseline["mce_std"]], [mce[0].mean(), mce[0].std()],
                               rtol=1e-6)
    np.testing.assert_allclose([results["mce"], results["mce_std"]], [mce[1].mean(), mce[1].std()],
                               rtol=1e-6)
    np.testing.assert_allclose([results["delta_mce"], results["delta_mce_std"]],
                               [(mce[1] - mce[0]).mean(), (mce[1] - mce[0]).std()], rtol=1e-5)
    columns = analysis.columns(results)
    assert columns["MCE"] == f"{mce[1].mean():.3f}"
    assert columns["ΔMCE"] == f"{(mce[1] - mce[0]).mean():+.3f}"


@pytest.mark.torch
def test_ece_matches_torch_bucketize(logits):
    torch = pytest.importorskip("torch")
    labels, original, _ = logits
    probabilities = torch.softmax(torch.from_numpy(original), dim=1)
    confidences, predictions = probabilities.max(dim=1)
    boundaries = torch.from_numpy((np.arange(M + 1) / M).astype(np.float32))
    bins = (torch.bucketize(confidences, boundaries, right=False) - 1).clamp(0, M - 1)
    correct = (predictions == torch.from_numpy(labels).long()).float()
    def bin_sums(values):
        return torch.zeros(M).index_add_(0, bins, values)

    gap_sums = (bin_sums(correct) - bin_sums(confidences)).abs()  # |B_b| |acc_b - conf_b|
    ece = gap_sums.sum() / N
    np.testing.assert_allclose(expected_calibration_error(original, labels, M), float(ece), atol=1e-6)
    mce = (gap_sums / bin_sums(torch.ones(N)).clamp(min=1)).max()
    np.testing.assert_allclose(maximum_calibration_error(original, labels, M), float(mce), atol=1e-6)


def test_perfectly_calibrated_model_has_ece_near_zero():
    rng = np.random.default_rng(1)
    n = 20000
    confidence = rng.uniform(0.5, 1.0, n)
    # two classes, class 0 predicted with softmax probability `confidence`, right with that probability
    logits = np.stack([np.zeros(n), np.log((1 - confidence) / confidence)], axis=1).astype(np.float32)
    labels = (rng.random(n) >= confidence).astype(np.int32)
    assert float(expected_calibration_error(logits, labels, M)) < 0.02
    shifted = np.stack([np.zeros(n), np.log((1 - confidence) / confidence) - 2.0], axis=1).astype(np.float32)
    assert float(expected_calibration_error(shifted, labels, M)) > 0.1  # over-confident: caught


def test_always_certain_model_has_ece_one_minus_accuracy():
    n, right = N, 1473
    logits = np.full((n, C), -1e4, np.float32)
    logits[:, 3] = 0.0  # softmax gives exactly 1.0 to class 3
    labels = np.full(n, 3, np.int32)
    labels[right:] = 5
    bins = calibration_bins(logits, labels, M)
    assert int(bins["count"][-1]) == n and float(bins["confidence"][-1]) == 1.0
    np.testing.assert_allclose(expected_calibration_error(logits, labels, M), 1 - right / n, rtol=1e-6)
    np.testing.assert_allclose(maximum_calibration_error(logits, labels, M), 1 - right / n, rtol=1e-6)


@pytest.mark.parametrize("num_bins", [10, 15])
def test_confidence_on_an_edge_goes_to_the_lower_bin(num_bins):
    edges = (np.arange(num_bins + 1) / num_bins).astype(np.float32)
    bins = confidence_bins(edges, np.ones(num_bins + 1, bool), num_bins)
    expected = np.ones(num_bins, int)
    expected[0] = 2  # 0 and e_1 both land in bin 0
    np.testing.assert_array_equal(bins["count"], expected)
    np.testing.assert_array_equal(bins["edges"], edges)
    np.testing.assert_allclose(bins["confidence"][1:], edges[2:])
    above = np.nextafter(edges[1:-1], np.float32(2))
    np.testing.assert_array_equal(confidence_bins(above, np.ones(num_bins - 1, bool), num_bins)["count"],
                                  np.r_[0, np.ones(num_bins - 1, int)])


def test_equal_logits_give_an_edge_confidence():
    logits = np.zeros((6, 4), np.float32)  # softmax 0.25 = 3/12 exactly, the upper edge of bin 2
    bins = calibration_bins(logits, np.zeros(6, np.int32), 12)
    np.testing.assert_array_equal(np.nonzero(np.asarray(bins["count"]))[0], [2])


def test_vmap_over_members_equals_loop(logits):
    labels, original, compressed = logits
    members = np.stack([original, compressed, 0.5 * original])
    functions = {
        "ece": functools.partial(expected_calibration_error, num_bins=M),
        "bins": functools.partial(calibration_bins, num_bins=M),
    }
    for name, function in functions.items():
        batched = jax.vmap(function, in_axes=(0, None))(members, labels)
        for m in range(len(members)):
            jax.tree.map(lambda b, s, m=m, name=name: np.testing.assert_allclose(b[m], s, atol=1e-6,
                                                                                 err_msg=name),
                         batched, function(members[m], labels))
    batched = jax.vmap(confidence_change, in_axes=(None, 0, None))(original, members, labels)
    for m in range(len(members)):
        jax.tree.map(lambda b, s, m=m: np.testing.assert_allclose(b[m], s, atol=1e-6),
                     batched, confidence_change(original, members[m], labels))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.1, 20.0))
def test_calibration_errors_are_bounded(seed, scale):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(size=(N, C))).astype(np.float32)
    labels = rng.integers(0, C, N).astype(np.int32)
    ece = float(expected_calibration_error(logits, labels, M))
    mce = float(maximum_calibration_error(logits, labels, M))
    assert 0 <= ece <= mce + 1e-6 <= 1 + 1e-6
    assert int(calibration_bins(logits, labels, M)["count"].sum()) == N


def test_bad_shapes_and_bins_are_user_errors():
    with pytest.raises(UserError, match="labels"):
        expected_calibration_error(np.zeros((4, 3), np.float32), np.zeros(5, np.int32))
    with pytest.raises(UserError, match="num_bins"):
        expected_calibration_error(np.zeros((4, 3), np.float32), np.zeros(4, np.int32), 0)
    with pytest.raises(UserError, match="differ"):
        confidence_change(np.zeros((4, 3), np.float32), np.zeros((4, 5), np.float32), np.zeros(4, np.int32))
