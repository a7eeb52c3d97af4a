"""Class- and sample-level analyses against scikit-learn, SciPy and NumPy loops (43 classes)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats
from sklearn import metrics

from compax.errors import UserError
from compax.measure.classes import (
    class_accuracy_change_pp,
    class_report,
    compare_classes,
    confusion_change_pp,
    confusion_matrix,
    frequency_bias,
    largest_changes,
    prediction_flips,
    row_normalized,
)

C = 43
N = 3000


def noisy_predictions(rng, labels, accuracy):
    """Predictions equal to `labels` with probability `accuracy`, a uniform class otherwise."""
    keep = rng.random(labels.shape) < accuracy
    return np.where(keep, labels, rng.integers(0, C, labels.shape)).astype(np.int32)


@pytest.fixture(scope="module")
def pair():
    """Imbalanced labels with classes 40-42 absent, and two models' predictions."""
    rng = np.random.default_rng(0)
    weights = 0.05 + rng.random(C) ** 2
    weights[40:] = 0
    labels = rng.choice(C, N, p=weights / weights.sum()).astype(np.int32)
    return labels, noisy_predictions(rng, labels, 0.8), noisy_predictions(rng, labels, 0.7)


def loop_confusion(labels, preds):
    matrix = np.zeros((C, C), np.int64)
    for t, p in zip(labels, preds, strict=True):
        if 0 <= t < C and 0 <= p < C:
            matrix[t, p] += 1
    return matrix


def loop_row_normalized(matrix):
    out = np.zeros(matrix.shape)
    for t in range(matrix.shape[0]):
        if matrix[t].sum() > 0:
            out[t] = matrix[t] / matrix[t].sum()
    return out


def test_confusion_matrix_matches_sklearn_and_drops_out_of_range(pair):
    labels, preds, _ = pair
    preds = preds.copy()
    preds[:5] = [-1, C, C + 3, -7, 0]
    got = np.asarray(confusion_matrix(labels, preds, C))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, metrics.confusion_matrix(labels, preds, labels=range(C)))
    np.testing.assert_array_equal(got, loop_confusion(labels, preds))
    assert got.sum() == N - 4


def test_row_normalized_matches_loop_with_empty_rows(pair):
    labels, preds, _ = pair
    matrix = loop_confusion(labels, preds)
    got = np.asarray(row_normalized(jnp.asarray(matrix)))
    np.testing.assert_allclose(got, loop_row_normalized(matrix), rtol=1e-6, atol=1e-7)
    assert not np.isnan(got).any() and (got[40:] == 0).all()
    np.testing.assert_allclose(got, metrics.confusion_matrix(labels, preds, labels=range(C),
                                                             normalize="true"), atol=1e-6)


def test_class_report_matches_sklearn(pair):
    labels, preds, _ = pair
    report = class_report(labels, preds, C)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, preds, labels=range(C), average=None, zero_division=0)
    np.testing.assert_allclose(report["precision"], precision, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(report["recall"], recall, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(report["f1"], f1, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(report["support"], support)
    present = np.unique(labels)
    assert len(present) == 40
    for average in ("micro", "macro"):
        expected = metrics.precision_recall_fscore_support(labels, preds, labels=present, average=average,
                                                           zero_division=0)
        for name, value in zip(("precision", "recall", "f1"), expected[:3], strict=True):
            np.testing.assert_allclose(report[f"{average}_{name}"], value, rtol=1e-5)
    np.testing.assert_allclose(report["accuracy"], metrics.accuracy_score(labels, preds), rtol=1e-6)
    # predictions into the absent classes 40-42 leave micro precision below accuracy
    assert report["micro_precision"] > report["accuracy"]


def test_class_report_matches_classification_report_when_every_class_is_present():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, C, N).astype(np.int32)
    preds = noisy_predictions(rng, labels, 0.6)
    report = class_report(labels, preds, C)
    expected = metrics.classification_report(labels, preds, labels=range(C), output_dict=True,
                                             zero_division=0)
    for c in range(C):
        for name, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            np.testing.assert_allclose(report[name][c], expected[str(c)][key], rtol=1e-5, atol=1e-7)
    for name, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
        np.testing.assert_allclose(report[f"macro_{name}"], expected["macro avg"][key], rtol=1e-5)
        np.testing.assert_allclose(report[f"micro_{name}"], expected["accuracy"], rtol=1e-5)


def test_changes_match_loops(pair):
    labels, original, compressed = pair
    expected = 100 * (loop_row_normalized(loop_confusion(labels, compressed))
                      - loop_row_normalized(loop_confusion(labels, original)))
    np.testing.assert_allclose(confusion_change_pp(labels, original, compressed, C), expected, atol=1e-4)
    class_expected = [100 * (np.mean(compressed[labels == c] == c) - np.mean(original[labels == c] == c))
                      if (labels == c).any() else 0.0 for c in range(C)]
    np.testing.assert_allclose(class_accuracy_change_pp(labels, original, compressed, C), class_expected,
                               atol=1e-4)


def test_prediction_flips_match_loop(pair):
    labels, original, compressed = pair
    counts = {"right_before": 0, "right_after": 0, "wrong_both": 0}
    for y, a, b in zip(labels, original, compressed, strict=True):
        if a != b:
            counts["right_before" if a == y else "right_after" if b == y else "wrong_both"] += 1
    flips = prediction_flips(labels, original, compressed)
    flipped = sum(counts.values())
    assert int(flips["flipped"]) == flipped
    np.testing.assert_allclose(flips["disagreement"], flipped / N, rtol=1e-6)
    assert {k: int(flips[k]) for k in counts} == counts


def test_compare_classes_gathers_the_parts(pair):
    labels, original, compressed = pair
    result = compare_classes(labels, original, compressed, C)
    np.testing.assert_allclose(result["accuracy_diff_pp"],
                               100 * (np.mean(compressed == labels) - np.mean(original == labels)), atol=1e-4)
    change = np.asarray(confusion_change_pp(labels, original, compressed, C))
    np.testing.assert_allclose(result["confusion_change_pp"], change, atol=1e-5)
    np.testing.assert_array_equal(result["class_accuracy_change_pp"], np.diag(change))
    cell = np.unravel_index(np.argmax(np.abs(change)), change.shape)
    np.testing.assert_allclose(result["max_confusion_change_pp"], change[cell], atol=1e-6)
    diagonal = np.diag(change)
    np.testing.assert_allclose(result["max_class_acc_change_pp"], diagonal[np.argmax(np.abs(diagonal))],
                               atol=1e-6)
    flips = prediction_flips(labels, original, compressed)
    for key in flips:
        np.testing.assert_allclose(result[key], flips[key])
    np.testing.assert_allclose(result["f1_original"], class_report(labels, original, C)["f1"], atol=1e-7)
    np.testing.assert_allclose(result["f1_compressed"], class_report(labels, compressed, C)["f1"], atol=1e-7)


def test_signed_maximum_keeps_a_negative_sign():
    labels = np.array([0, 0, 1, 1], np.int32)
    result = compare_classes(labels, labels, np.array([1, 1, 1, 1], np.int32), 2)
    assert float(result["max_class_acc_change_pp"]) == -100.0
    assert float(result["max_confusion_change_pp"]) == -100.0  # cell (0, 0) comes before (0, 1)


def test_vmap_over_members_equals_loop(pair):
    labels, original, _ = pair
    rng = np.random.default_rng(2)
    members = np.stack([noisy_predictions(rng, labels, a) for a in (0.5, 0.7, 0.9)])
    batched = jax.vmap(functools.partial(compare_classes, num_classes=C), in_axes=(None, None, 0))(
        labels, original, members)
    reports = jax.vmap(functools.partial(class_report, num_classes=C), in_axes=(None, 0))(labels, members)
    for m in range(len(members)):
        single = compare_classes(labels, original, members[m], C)
        for key, value in single.items():
            np.testing.assert_allclose(batched[key][m], value, atol=1e-5, err_msg=key)
        for key, value in class_report(labels, members[m], C).items():
            np.testing.assert_allclose(reports[key][m], value, atol=1e-6, err_msg=key)


SMALL_C, SMALL_N = 5, 60
small_labels = hnp.arrays(np.int32, SMALL_N, elements=st.integers(0, SMALL_C - 1))


@settings(max_examples=30, deadline=None)
@given(labels=small_labels, preds=small_labels)
def test_identical_predictions_change_nothing(labels, preds):
    result = compare_classes(labels, preds, preds, SMALL_C)
    assert float(result["disagreement"]) == 0 and int(result["flipped"]) == 0
    assert float(result["accuracy_diff_pp"]) == 0
    assert not np.asarray(result["confusion_change_pp"]).any()
    assert float(result["max_confusion_change_pp"]) == 0


@settings(max_examples=30, deadline=None)
@given(labels=small_labels, original=small_labels, compressed=small_labels)
def test_rows_sum_to_one_and_flips_partition(labels, original, compressed):
    matrix = confusion_matrix(labels, original, SMALL_C)
    support = np.asarray(matrix).sum(axis=1)
    sums = np.asarray(row_normalized(matrix)).sum(axis=1)
    np.testing.assert_allclose(sums[support > 0], 1.0, rtol=1e-6)
    assert (sums[support == 0] == 0).all()
    flips = prediction_flips(labels, original, compressed)
    assert int(flips["flipped"]) == int(flips["right_before"] + flips["right_after"] + flips["wrong_both"])
    assert int(flips["flipped"]) == int((original != compressed).sum())
    # each row of the confusion change sums to 0 where the class has samples
    change = np.asarray(confusion_change_pp(labels, original, compressed, SMALL_C))
    np.testing.assert_allclose(change.sum(axis=1), 0.0, atol=1e-4)


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(UserError, match="shape"):
        confusion_matrix(np.zeros(4, np.int32), np.zeros(5, np.int32), 3)
    with pytest.raises(UserError, match="preds_compressed"):
        prediction_flips(np.zeros(4, np.int32), np.zeros(4, np.int32), np.zeros((4, 1), np.int32))


def test_largest_changes_orders_by_magnitude_and_names_classes():
    names = ["stop", "yield", "limit30"]
    change = np.array([[-5.0, 3.0, 2.0], [0.0, 0.0, 0.0], [1.0, -9.0, 8.0]])
    assert largest_changes(change, names, k=3) == [
        {"true": "limit30", "predicted": "yield", "change_pp": -9.0},
        {"true": "limit30", "predicted": "limit30", "change_pp": 8.0},
        {"true": "stop", "predicted": "stop", "change_pp": -5.0},
    ]
    assert len(largest_changes(change, names, k=100)) == 6  # the zero cells are left out
    assert largest_changes(np.array([1.0, -2.0, 2.0]), names) == [
        {"class": "yield", "change_pp": -2.0}, {"class": "limit30", "change_pp": 2.0},
        {"class": "stop", "change_pp": 1.0}]
    with pytest.raises(UserError, match="class names"):
        largest_changes(change, names[:2])
    with pytest.raises(UserError, match="k="):
        largest_changes(change, names, k=-1)


def test_frequency_bias_matches_rank_correlation_formula():
    rng = np.random.default_rng(3)
    counts = rng.permutation(np.arange(10, 10 + C) * 7)  # distinct counts: ranks without ties
    change = 0.3 * np.argsort(np.argsort(counts)) + rng.normal(0, 4, C)
    ranks_x, ranks_y = np.argsort(np.argsort(counts)), np.argsort(np.argsort(change))
    rho = np.corrcoef(ranks_x, ranks_y)[0, 1]
    t = rho * np.sqrt((C - 2) / (1 - rho ** 2))
    result = frequency_bias(counts, change)
    np.testing.assert_allclose(result["spearman_rho"], rho, rtol=1e-10)
    np.testing.assert_allclose(result["p_value"], 2 * stats.t.sf(abs(t), C - 2), rtol=1e-8)
    assert isinstance(result["spearman_rho"], float) and result["spearman_rho"] > 0


def test_frequency_bias_constant_input_gives_none():
    assert frequency_bias(np.arange(5), np.zeros(5)) == {"spearman_rho": None, "p_value": None}
    with pytest.raises(UserError, match="same C"):
        frequency_bias(np.arange(5), np.zeros(4))


def test_seed_disagreement_of_the_original_population_matches_a_loop():
    """The floor of an independently seeded variant's flips: member m against member m-1
    (cyclically), as a loop computes it; absent for one member."""
    from types import SimpleNamespace

    from compax.analyses.classes import ClassLevel

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, 500).astype(np.int32)
    preds = np.where(rng.random((5, 500)) < 0.8, labels, rng.integers(0, 7, (5, 500))).astype(np.int32)
    analysis = ClassLevel()
    for members in (5, 1):
        ref = SimpleNamespace(preds=preds[:members], members=members, labels=labels, num_classes=7)
        analysis.prepare(ref)
        results, _ = analysis.baseline(ref)
        if members == 1:
            assert "seed_disagreement" not in results
            continue
        expected = np.mean([np.mean(preds[m] != preds[m - 1]) for m in range(members)])
        assert results["seed_disagreement"] == pytest.approx(expected)
