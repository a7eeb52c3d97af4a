"""Population statistics of Hooker et al. (2019), "What Do Compressed Deep Neural Networks Forget?".

Inputs are predicted labels of two populations on the same N test samples: `preds_original (P, N)`
of P uncompressed members (seeds) and `preds_compressed (P', N)` of P' compressed ones, plus the true
`labels (N,)`. compax compresses each member of one trained population, so usually P' = P and member
i of both shares a seed, but the class test treats the populations as independent samples, as Hooker
et al. do with separately trained populations, so P != P' is allowed there.

- Class level: the normalised class accuracy of every member and a two-sided Welch t-test per class
  between the populations (`impacted_classes`), with an optional multiple-testing correction.
- Sample level: compression identified exemplars (CIEs; PIEs for pruning), the samples whose modal
  label differs between the populations (`compression_identified_exemplars`).
- Single model: the one-standard-deviation band rule of the Hooker thesis (`band_rule`), per paired
  member and vmapped over members (`band_impacted_classes`).

Per-member statistics are jnp, `jit`-compatible with `num_classes` static and vmapped over the member
axis; the t-test and the corrections are NumPy/SciPy in float64 on the (P, C) results.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from compax.errors import UserError

CORRECTIONS = (None, "bonferroni", "holm", "fdr_bh")


def _class_accuracy_one(labels, pred, num_classes: int):
    support = jax.ops.segment_sum(jnp.ones(labels.shape, jnp.float32), labels, num_classes)
    correct = jax.ops.segment_sum((pred == labels).astype(jnp.float32), labels, num_classes)
    return correct / support


@functools.partial(jax.jit, static_argnames="num_classes")
def class_accuracy(labels, preds, num_classes: int):
    """a[m, c] = #{i : y_i = c, preds[m, i] = c} / #{i : y_i = c}, shape (P, C) float32.

    The class accuracy (recall) of every member m (Hooker et al. 2019, Sec. 2); NaN for a class
    without samples (no data). Labels and predictions must lie in [0, C). Vmapped over members.
    """
    return jax.vmap(_class_accuracy_one, in_axes=(None, 0, None))(jnp.asarray(labels), jnp.asarray(preds),
                                                                  num_classes)


@functools.partial(jax.jit, static_argnames="num_classes")
def normalized_class_accuracy(labels, preds, num_classes: int):
    """a[m, c] / A[m], shape (P, C) float32, with A[m] = mean_i [preds[m, i] = y_i] the overall accuracy.

    Hooker et al. (2019, Sec. 2) normalise each member's class accuracy by its overall accuracy, so
    a class counts as impacted only if it changes more than the model as a whole. NaN for a class
    without samples.
    """
    labels, preds = jnp.asarray(labels), jnp.asarray(preds)
    overall = jnp.mean(preds == labels[None], axis=1)
    return class_accuracy(labels, preds, num_classes) / overall[:, None]


def welch_t_test(sample_a, sample_b):
    """Two-sided Welch t-test per column of `sample_a (Pa, C)` against `sample_b (Pb, C)`: (t, p), (C,) each.

    t = (mean_a - mean_b) / sqrt(s_a^2/Pa + s_b^2/Pb) with s^2 the unbiased variances, Welch-Satterthwaite
    degrees of freedom nu = (s_a^2/Pa + s_b^2/Pb)^2 / ((s_a^2/Pa)^2/(Pa-1) + (s_b^2/Pb)^2/(Pb-1)) and
    p = 2 (1 - F_nu(|t|)), as `scipy.stats.ttest_ind(a, b, equal_var=False)` (the test of Hooker et al.
    2019). A column where both samples have zero variance carries no sampling noise: it gets t = 0 and
    p = 1 (no evidence) when the means are equal and t = +-inf, p = 0 when they differ (where SciPy
    gives NaN for equal means). Columns holding NaN give NaN. Float64, NumPy; Pa, Pb >= 2.
    """
    sample_a, sample_b = np.asarray(sample_a, np.float64), np.asarray(sample_b, np.float64)
    size_a, size_b = len(sample_a), len(sample_b)
    if min(size_a, size_b) < 2:
        raise UserError("a population of at least 2 members per variant is needed for the Welch test: "
                        "set --config.population=2 or more")
    difference = sample_a.mean(axis=0) - sample_b.mean(axis=0)
    error_a = sample_a.var(axis=0, ddof=1) / size_a
    error_b = sample_b.var(axis=0, ddof=1) / size_b
    with np.errstate(divide="ignore", invalid="ignore"):
        t = difference / np.sqrt(error_a + error_b)
        dof = (error_a + error_b) ** 2 / (error_a ** 2 / (size_a - 1) + error_b ** 2 / (size_b - 1))
    p = 2.0 * stats.t.sf(np.abs(t), dof)
    degenerate = (error_a == 0) & (error_b == 0)
    t = np.where(degenerate, np.where(difference == 0, 0.0, np.copysign(np.inf, difference)), t)
    p = np.where(degenerate, np.where(difference == 0, 1.0, 0.0), p)
    return t, p


def adjust_p_values(p, correction: str | None):
    """p-values adjusted for testing m hypotheses at once, in the order of `p` (float64, NumPy).

    None: p unchanged. "bonferroni": min(1, m p_i). "holm" (Holm 1979): with p_(1) <= ... <= p_(m)
    sorted, p~_(k) = max_{j<=k} min(1, (m - j + 1) p_(j)). "fdr_bh" (Benjamini & Hochberg 1995):
    p~_(k) = min_{j>=k} min(1, m p_(j) / j), as `scipy.stats.false_discovery_control`. Rejecting
    p~ <= alpha controls the family-wise error rate (bonferroni, holm) or the false discovery rate
    (fdr_bh) at alpha. Ties are ordered stably.
    """
    if correction not in CORRECTIONS:
        raise UserError(f"unknown multiple-testing correction {correction!r}: use None, 'bonferroni', "
                        "'holm' or 'fdr_bh'")
    p = np.asarray(p, np.float64)
    count = len(p)
    if correction is None:
        return p.copy()
    if correction == "bonferroni":
        return np.minimum(1.0, count * p)
    order = np.argsort(p, kind="stable")
    rank = np.arange(1, count + 1)
    if correction == "holm":
        adjusted = np.maximum.accumulate((count - rank + 1) * p[order])
    else:
        adjusted = np.minimum.accumulate((count * p[order] / rank)[::-1])[::-1]
    result = np.empty(count)
    result[order] = np.minimum(1.0, adjusted)
    return result


@functools.partial(jax.jit, static_argnames="num_classes")
def modal_labels(preds, num_classes: int):
    """The modal label of a population per sample and the share of members predicting it, (N,) each.

    mode_i = argmax_c #{m : preds[m, i] = c}, ties broken toward the smallest label (as
    `scipy.stats.mode`); agreement_i = #{m : preds[m, i] = mode_i} / P. Hooker et al. (2019) compare
    these modes between populations. Predictions must lie in [0, C).
    """
    preds = jnp.asarray(preds)
    members, samples = preds.shape
    counts = jnp.zeros((samples, num_classes), jnp.int32)
    counts = counts.at[jnp.arange(samples)[None, :], preds].add(1, mode="drop")
    return jnp.argmax(counts, axis=1).astype(jnp.int32), counts.max(axis=1) / members


def _checked_labels(values, num_classes: int, name: str, ndim: int) -> np.ndarray:
    """`values` as a NumPy integer array, (N,) for ndim 1 or (members, N) for ndim 2, entries in [0, C)."""
    values = np.asarray(values)
    if values.ndim != ndim or not np.issubdtype(values.dtype, np.integer):
        raise UserError(f"{name} is {values.dtype} of shape {values.shape}: pass integer labels of shape "
                        f"{'(N,)' if ndim == 1 else '(members, N)'}")
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise UserError(f"{name} holds labels outside [0, {num_classes}): pass class indices (argmax "
                        f"predictions) of a task with num_classes={num_classes}")
    return values


def _populations(preds_original, preds_compressed, num_classes: int, labels=None):
    """The validated inputs as NumPy arrays: preds_original (P, N), preds_compressed (P', N), labels (N,)."""
    preds_original = _checked_labels(preds_original, num_classes, "preds_original", 2)
    preds_compressed = _checked_labels(preds_compressed, num_classes, "preds_compressed", 2)
    if labels is not None:
        labels = _checked_labels(labels, num_classes, "labels", 1)
    sizes = [preds_original.shape[1], preds_compressed.shape[1]] + ([] if labels is None else [len(labels)])
    if len(set(sizes)) > 1:
        raise UserError(f"preds_original, preds_compressed (and labels) cover {sizes} samples: pass the "
                        "predictions of every population on the same test samples")
    return preds_original, preds_compressed, labels


def impacted_classes(labels, preds_original, preds_compressed, num_classes: int, alpha: float = 0.05,
                     correction: str | None = None) -> dict:
    """The classes whose normalised accuracy differs significantly between the populations.

    Hooker et al. (2019): per class c a two-sided Welch t-test (`welch_t_test`) of the normalised class
    accuracies a[m, c] / A[m] of the compressed members against those of the original members; class c
    is impacted when its p-value, adjusted by `correction` over the tested classes (`adjust_p_values`),
    is <= alpha. A class without test samples is not tested (t, p, p_adjusted NaN, never significant).

    Returns t, p, p_adjusted (C,) float64 (t > 0: the compressed population is relatively better),
    significant (C,) bool, significant_classes (list of ints), count, correction, alpha, and
    mean_original, mean_compressed (C,): the population means of the normalised class accuracy.
    """
    preds_original, preds_compressed, labels = _populations(preds_original, preds_compressed,
                                                            num_classes, labels)
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha={alpha} is outside (0, 1): pass a significance level such as 0.05")
    original = np.asarray(normalized_class_accuracy(labels, preds_original, num_classes), np.float64)
    compressed = np.asarray(normalized_class_accuracy(labels, preds_compressed, num_classes), np.float64)
    t, p = welch_t_test(compressed, original)
    tested = np.isfinite(p)
    p_adjusted = np.full(num_classes, np.nan)
    p_adjusted[tested] = adjust_p_values(p[tested], correction)
    significant = p_adjusted <= alpha
    return {"t": t, "p": p, "p_adjusted": p_adjusted, "significant": significant,
            "significant_classes": np.flatnonzero(significant).tolist(), "count": int(significant.sum()),
            "correction": correction, "alpha": float(alpha),
            "mean_original": original.mean(axis=0), "mean_compressed": compressed.mean(axis=0)}


def compression_identified_exemplars(preds_original, preds_compressed, num_classes: int,
                                     labels=None) -> dict:
    """Compression identified exemplars: samples whose modal label differs between the populations.

    Hooker et al. (2019) call them pruning identified exemplars (PIEs) for pruning: sample i is a CIE
    when mode_i(original) != mode_i(compressed), with the modal label of `modal_labels` (ties broken
    toward the smallest label).

    Returns modal_original, modal_compressed (N,) int32, mask (N,) bool, count (the lead's `pies`),
    share = count / N, indices (list of ints), per_class (C,) int: CIEs per true label (None without
    `labels`), and exemplars: one dict per CIE, in index order, with index, label (with `labels`),
    modal_original, modal_compressed, agreement_original and agreement_compressed (the share of each
    population's members predicting its modal label), for showing the images.
    """
    preds_original, preds_compressed, labels = _populations(preds_original, preds_compressed,
                                                            num_classes, labels)
    modal_original, agreement_original = map(np.asarray, modal_labels(preds_original, num_classes))
    modal_compressed, agreement_compressed = map(np.asarray, modal_labels(preds_compressed, num_classes))
    mask = modal_original != modal_compressed
    indices = np.flatnonzero(mask)
    exemplars = [{"index": int(i), **({} if labels is None else {"label": int(labels[i])}),
                  "modal_original": int(modal_original[i]), "modal_compressed": int(modal_compressed[i]),
                  "agreement_original": float(agreement_original[i]),
                  "agreement_compressed": float(agreement_compressed[i])} for i in indices]
    per_class = None if labels is None else np.bincount(labels[mask], minlength=num_classes)
    return {"modal_original": modal_original, "modal_compressed": modal_compressed, "mask": mask,
            "count": int(mask.sum()), "share": float(mask.mean()),
            "indices": indices.tolist(), "per_class": per_class, "exemplars": exemplars}


def _band_side(labels, pred, num_classes: int, width) -> dict:
    accuracy = _class_accuracy_one(labels, pred, num_classes)
    overall = jnp.mean(pred == labels)
    spread = jnp.nanstd(accuracy)
    distance = jnp.abs(accuracy - overall)
    return {"class_accuracy": accuracy, "overall": overall, "class_mean": jnp.nanmean(accuracy),
            "class_std": spread, "distance": distance, "outside": distance > width * spread}


@functools.partial(jax.jit, static_argnames="num_classes")
def band_rule(labels, pred_original, pred_compressed, num_classes: int, width=1.0) -> dict:
    """The single-model impacted-class rule of the Hooker thesis, for one model and its compressed version.

    Per model: class accuracies a_c, overall accuracy A (over samples), their mean and standard
    deviation s over classes (ddof 0, classes without samples left out), and the band A +- width * s;
    class c lies outside when |a_c - A| > width * s. A class is impacted when it crosses the band:
    inside for the original and outside for the compressed model, or the other way round.
    The thesis counts the images behind such shifts; here
        distance_change_c = |a'_c - A'| - |a_c - A|   (primes: compressed model)
        impacted_images   = sum_c n_c |distance_change_c|   (n_c: test samples of class c),
    the number of class-c images whose change of correctness would account for the class moving
    towards or away from the overall accuracy (absolute, so classes moving in opposite directions do
    not cancel; classes without samples add 0). `jit`- and `vmap`-compatible over the predictions.

    Returns class_accuracy_*, distance_change (C,), overall_*, class_mean_*, class_std_* (scalars),
    outside_* and crossed (C,) bool, impacted_images (scalar), with * = original / compressed.
    """
    labels = jnp.asarray(labels)
    before = _band_side(labels, jnp.asarray(pred_original), num_classes, width)
    after = _band_side(labels, jnp.asarray(pred_compressed), num_classes, width)
    support = jax.ops.segment_sum(jnp.ones(labels.shape, jnp.float32), labels, num_classes)
    change = after.pop("distance") - before.pop("distance")
    return {"distance_change": change, "crossed": before["outside"] != after["outside"],
            "impacted_images": jnp.sum(jnp.where(support > 0, support * jnp.abs(change), 0.0)),
            **{f"{key}_original": value for key, value in before.items()},
            **{f"{key}_compressed": value for key, value in after.items()}}


def band_impacted_classes(labels, preds_original, preds_compressed, num_classes: int,
                          width: float = 1.0) -> dict:
    """`band_rule` for every paired member (member m compressed from member m), vmapped: each entry of
    `band_rule` gains a leading member axis (P, ...). Needs P = P'."""
    preds_original, preds_compressed, labels = _populations(preds_original, preds_compressed,
                                                            num_classes, labels)
    if len(preds_original) != len(preds_compressed):
        raise UserError(f"the band rule compares each member with its own compressed version, but there are "
                        f"{len(preds_original)} original and {len(preds_compressed)} compressed members: "
                        "pass the compressed versions of the same members")
    rule = functools.partial(band_rule, num_classes=num_classes, width=width)
    return jax.vmap(rule, in_axes=(None, 0, 0))(labels, preds_original, preds_compressed)


def _json_floats(values) -> list:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, np.float64).tolist()]


def population_summary(labels, preds_original, preds_compressed, num_classes: int, alpha: float = 0.05,
                       correction: str | None = None, width: float = 1.0) -> dict:
    """The Hooker et al. (2019) statistics of one compressed population as a JSON-friendly dict.

    From `impacted_classes`: significant_classes, count, correction, alpha, and per class p,
    p_adjusted and normalized_accuracy_change = mean_compressed - mean_original (None where a class
    was not tested). From `compression_identified_exemplars`: pies (the CIE count), pie_share,
    pies_per_class. From `band_impacted_classes`, averaged over the members: band = {width,
    outside_original, outside_compressed, crossed (mean numbers of classes), crossing_share (per class,
    the share of members where it crossed), impacted_images}; band is None when P != P' (unpaired).
    """
    classes = impacted_classes(labels, preds_original, preds_compressed, num_classes, alpha, correction)
    exemplars = compression_identified_exemplars(preds_original, preds_compressed, num_classes, labels)
    summary = {"significant_classes": classes["significant_classes"], "count": classes["count"],
               "correction": correction, "alpha": float(alpha), "p": _json_floats(classes["p"]),
               "p_adjusted": _json_floats(classes["p_adjusted"]),
               "normalized_accuracy_change": _json_floats(classes["mean_compressed"]
                                                          - classes["mean_original"]),
               "pies": exemplars["count"], "pie_share": exemplars["share"],
               "pies_per_class": exemplars["per_class"].tolist(), "band": None}
    if len(preds_original) == len(preds_compressed):
        band = band_impacted_classes(labels, preds_original, preds_compressed, num_classes, width)
        summary["band"] = {
            "width": float(width),
            "outside_original": float(np.mean(np.sum(band["outside_original"], axis=1))),
            "outside_compressed": float(np.mean(np.sum(band["outside_compressed"], axis=1))),
            "crossed": float(np.mean(np.sum(band["crossed"], axis=1))),
            "crossing_share": np.mean(np.asarray(band["crossed"]), axis=0).tolist(),
            "impacted_images": float(np.mean(band["impacted_images"]))}
    return summary
