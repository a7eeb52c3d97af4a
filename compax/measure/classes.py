"""Class-level and sample-level comparison of an original and a compressed classifier.

Schwaiger et al. (2022, "Beyond Test Accuracy") compare class-wise accuracy and row-normalised
confusion matrices of a model and its compressed version in percentage points (pp), and the share of
test samples whose prediction changes; Hooker's thesis ("What do compressed DNNs forget?") adds
precision, recall and F1 per class and micro/macro averaged.

Everything in jnp takes integer predictions (argmax of the logits) and is `jit`-compatible with
`num_classes` static, and `vmap`-compatible over a leading member axis of the predictions, e.g.
`jax.vmap(functools.partial(compare_classes, num_classes=C), in_axes=(None, 0, 0))(labels,
preds_original, preds_compressed)` for (P, N) predictions of P members. Labels and predictions outside
[0, num_classes) are not counted in any confusion matrix. `largest_changes` and `frequency_bias`
are plain NumPy/SciPy helpers on the results.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from compax.errors import UserError


def _check_pair(labels, preds, what: str = "preds"):
    if labels.ndim != 1 or labels.shape != preds.shape:
        raise UserError(f"labels {labels.shape} and {what} {preds.shape} differ in shape: pass one "
                        "integer label and one predicted class per sample, both of shape (N,)")


def _check_num_classes(num_classes):
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise UserError(f"num_classes={num_classes!r} is not a positive int: pass the number of classes")


def _safe_divide(numerator, denominator):
    """numerator / denominator as float32, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    numerator = jnp.asarray(numerator, jnp.float32)
    denominator = jnp.asarray(denominator, jnp.float32)
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


def _largest_magnitude(values):
    """The entry of `values` with the largest |value|, with its sign (the first one in row-major order
    among equal magnitudes)."""
    flat = values.ravel()
    return flat[jnp.argmax(jnp.abs(flat))]


@functools.partial(jax.jit, static_argnames="num_classes")
def confusion_matrix(labels, preds, num_classes: int):
    """Counts M[t, p] = #{i : labels_i = t, preds_i = p}, shape (C, C) int32, rows = true class.

    As `sklearn.metrics.confusion_matrix(labels, preds, labels=range(C))`; pairs with a label or a
    prediction outside [0, C) are not counted.
    """
    labels, preds = jnp.asarray(labels), jnp.asarray(preds)
    _check_pair(labels, preds)
    _check_num_classes(num_classes)
    valid = (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_classes)
    cell = jnp.where(valid, labels * num_classes + preds, num_classes * num_classes)
    counts = jnp.zeros(num_classes * num_classes + 1, jnp.int32).at[cell].add(1)
    return counts[:-1].reshape(num_classes, num_classes)


@jax.jit
def row_normalized(confusion):
    """R[t, p] = M[t, p] / sum_p' M[t, p'] (float32): the share of class t predicted as p.

    The diagonal is the class accuracy (recall). Rows of classes without samples are 0, not NaN.
    """
    confusion = jnp.asarray(confusion)
    return _safe_divide(confusion, confusion.sum(axis=1, keepdims=True))


def _report_from_confusion(confusion):
    """The metrics of `class_report` from a (C, C) confusion matrix."""
    true_positives = jnp.diagonal(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    total = support.sum()
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * true_positives, predicted + support)
    present = support > 0
    num_present = present.sum()
    predicted_as_present = jnp.where(present, predicted, 0).sum()
    correct = true_positives.sum()

    def macro(per_class):
        return _safe_divide(jnp.where(present, per_class, 0.0).sum(), num_present)

    return {
        "precision": precision, "recall": recall, "f1": f1, "support": support,
        "accuracy": _safe_divide(correct, total),
        "micro_precision": _safe_divide(correct, predicted_as_present),
        "micro_recall": _safe_divide(correct, total),
        "micro_f1": _safe_divide(2 * correct, predicted_as_present + total),
        "macro_precision": macro(precision), "macro_recall": macro(recall), "macro_f1": macro(f1),
    }


@functools.partial(jax.jit, static_argnames="num_classes")
def class_report(labels, preds, num_classes: int) -> dict:
    """Precision, recall and F1 per class and averaged (Hooker thesis; sklearn's definitions).

    With TP_c = M[c, c], support S_c = sum_p M[c, p] and predicted P_c = sum_t M[t, c] from
    `confusion_matrix`: precision_c = TP_c / P_c, recall_c = TP_c / S_c (the class accuracy),
    f1_c = 2 TP_c / (P_c + S_c), each 0 where its denominator is 0 (sklearn's zero_division=0).
    Per-class arrays have all C classes, as `precision_recall_fscore_support(labels, preds,
    labels=range(C), average=None, zero_division=0)`. accuracy = sum_c TP_c / N.

    The averages run over the classes present in `labels` (S_c > 0), as sklearn with
    `labels=np.unique(labels)`: macro_* is the unweighted mean of the per-class values over them;
    micro_precision = sum TP / (predictions falling into present classes), micro_recall = sum TP / N
    (= accuracy), micro_f1 = 2 sum TP / (that prediction count + N). When every class is present,
    micro_precision = micro_recall = micro_f1 = accuracy.

    Returns jnp arrays: precision, recall, f1 (C,) float32, support (C,) int32; scalars accuracy,
    micro_precision, micro_recall, micro_f1, macro_precision, macro_recall, macro_f1.
    """
    return _report_from_confusion(confusion_matrix(labels, preds, num_classes))


def _change_pp(count_original, total_original, count_compressed, total_compressed):
    """100 (count_c / total_c - count_o / total_o) in pp (a ratio with total 0 is 0); exactly 0 where
    both counts and both totals are equal, which two separately compiled float32 divisions need not
    give."""
    unchanged = (count_compressed == count_original) & (total_compressed == total_original)
    change = 100.0 * (_safe_divide(count_compressed, total_compressed)
                      - _safe_divide(count_original, total_original))
    return jnp.where(unchanged, 0.0, change)


def _confusion_change_pp(confusion_original, confusion_compressed):
    """100 (R_compressed - R_original) from two confusion matrices."""
    return _change_pp(confusion_original, confusion_original.sum(axis=1, keepdims=True),
                      confusion_compressed, confusion_compressed.sum(axis=1, keepdims=True))


@functools.partial(jax.jit, static_argnames="num_classes")
def confusion_change_pp(labels, preds_original, preds_compressed, num_classes: int):
    """D = 100 (R_compressed - R_original): change of the row-normalised confusion matrix in pp.

    Schwaiger et al. (2022), confusion-matrix differences. D[t, p] > 0: the compressed model predicts
    true class t as p more often. The diagonal is `class_accuracy_change_pp`. Shape (C, C) float32;
    a cell whose count and row total are unchanged is exactly 0.
    """
    return _confusion_change_pp(confusion_matrix(labels, preds_original, num_classes),
                                confusion_matrix(labels, preds_compressed, num_classes))


@jax.jit
def prediction_flips(labels, preds_original, preds_compressed) -> dict:
    """How many predictions compression changes, and in which direction (Schwaiger et al. 2022).

    A sample flips when preds_compressed_i != preds_original_i. Returns jnp scalars:
    disagreement = #flipped / N (a share in [0, 1], 0 for N = 0), flipped = #flipped (int32), and a
    partition of the flipped samples (int32): right_before (original right, compressed wrong),
    right_after (original wrong, compressed right), wrong_both (both wrong, with different labels).
    """
    labels, preds_original, preds_compressed = map(jnp.asarray, (labels, preds_original, preds_compressed))
    _check_pair(labels, preds_original, "preds_original")
    _check_pair(labels, preds_compressed, "preds_compressed")
    flipped = preds_original != preds_compressed
    right_before = flipped & (preds_original == labels)
    right_after = flipped & (preds_compressed == labels)
    count = flipped.sum(dtype=jnp.int32)
    return {
        "disagreement": _safe_divide(count, labels.shape[0]),
        "flipped": count,
        "right_before": right_before.sum(dtype=jnp.int32),
        "right_after": right_after.sum(dtype=jnp.int32),
        "wrong_both": (flipped & ~right_before & ~right_after).sum(dtype=jnp.int32),
    }


@functools.partial(jax.jit, static_argnames="num_classes")
def class_accuracy_change_pp(labels, preds_original, preds_compressed, num_classes: int):
    """100 (recall_compressed_c - recall_original_c): class-wise accuracy change in pp, shape (C,).

    Schwaiger et al. (2022), class-wise accuracy differences. Classes without samples give 0.
    """
    return jnp.diagonal(confusion_change_pp(labels, preds_original, preds_compressed, num_classes))


@functools.partial(jax.jit, static_argnames="num_classes")
def compare_classes(labels, preds_original, preds_compressed, num_classes: int) -> dict:
    """Every class- and sample-level difference of one original/compressed pair, as jnp arrays.

    Schwaiger et al. (2022) and Hooker's thesis; all differences are compressed minus original.
    Keys: accuracy_diff_pp = 100 (acc_compressed - acc_original); the `prediction_flips` entries
    (disagreement, flipped, right_before, right_after, wrong_both); class_accuracy_change_pp (C,);
    max_class_acc_change_pp, the class accuracy change of largest magnitude with its sign;
    confusion_change_pp (C, C) as `confusion_change_pp`; max_confusion_change_pp, the cell of
    largest magnitude over ALL cells (diagonal and off-diagonal) with its sign; f1_original and
    f1_compressed (C,) per-class F1 as `class_report`. Ties in magnitude take the first entry in
    row-major order. `vmap` over a member axis of both predictions gives one entry per member.
    """
    confusion_original = confusion_matrix(labels, preds_original, num_classes)
    confusion_compressed = confusion_matrix(labels, preds_compressed, num_classes)
    report_original = _report_from_confusion(confusion_original)
    report_compressed = _report_from_confusion(confusion_compressed)
    change = _confusion_change_pp(confusion_original, confusion_compressed)
    class_change = jnp.diagonal(change)
    return {
        "accuracy_diff_pp": _change_pp(jnp.trace(confusion_original), confusion_original.sum(),
                                       jnp.trace(confusion_compressed), confusion_compressed.sum()),
        **prediction_flips(labels, preds_original, preds_compressed),
        "class_accuracy_change_pp": class_change,
        "max_class_acc_change_pp": _largest_magnitude(class_change),
        "confusion_change_pp": change,
        "max_confusion_change_pp": _largest_magnitude(change),
        "f1_original": report_original["f1"],
        "f1_compressed": report_compressed["f1"],
    }


def largest_changes(change_pp, class_names, k: int = 10) -> list[dict]:
    """The k non-zero changes of largest |change|, largest first (Schwaiger et al. 2022 tables).

    For a (C, C) confusion change each entry is {"true": name, "predicted": name, "change_pp": x};
    for a (C,) class accuracy change it is {"class": name, "change_pp": x}. Cells whose change is
    exactly 0 are left out, so fewer than k entries come back when fewer cells changed; equal
    magnitudes keep row-major order. Plain NumPy, not for jit/vmap.
    """
    change_pp = np.asarray(change_pp, np.float64)
    names = [str(name) for name in class_names]
    num_classes = len(names)
    if change_pp.shape not in ((num_classes,), (num_classes, num_classes)):
        raise UserError(f"change_pp has shape {change_pp.shape} but there are {num_classes} class "
                        "names: pass a (C,) or (C, C) change for the same C classes")
    if not isinstance(k, (int, np.integer)) or k < 0:
        raise UserError(f"k={k!r} is not a non-negative int: pass how many changes to list")
    flat = change_pp.ravel()
    order = np.argsort(-np.abs(flat), kind="stable")
    order = order[flat[order] != 0][:k]
    if change_pp.ndim == 1:
        return [{"class": names[i], "change_pp": float(flat[i])} for i in order]
    return [{"true": names[i // num_classes], "predicted": names[i % num_classes],
             "change_pp": float(flat[i])} for i in order]


def frequency_bias(class_counts, class_acc_change_pp) -> dict:
    """Spearman rank correlation between class frequency and class accuracy change.

    rho = Pearson correlation of the ranks (average ranks for ties) of class_counts (e.g. training
    images per class) and class_acc_change_pp, with scipy.stats.spearmanr's two-sided p-value. On an
    imbalanced dataset such as GTSRB, rho > 0 says rare classes lose more accuracy (Hooker et al.'s
    question whether compression hurts the long tail). Returns plain floats {"spearman_rho",
    "p_value"}; a value SciPy returns as NaN (a constant input, or a p-value with fewer than 3
    classes) is None. Plain SciPy, not for jit/vmap.
    """
    counts = np.asarray(class_counts, np.float64)
    change = np.asarray(class_acc_change_pp, np.float64)
    if counts.ndim != 1 or counts.shape != change.shape or counts.size < 2:
        raise UserError(f"class_counts {counts.shape} and class_acc_change_pp {change.shape} must be "
                        "(C,) vectors over the same C >= 2 classes: pass one count and one change per class")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        result = stats.spearmanr(counts, change)
    rho, p_value = float(result.statistic), float(result.pvalue)
    return {"spearman_rho": None if np.isnan(rho) else rho,
            "p_value": None if np.isnan(p_value) else p_value}
