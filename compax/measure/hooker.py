"""Population statistics of Hooker et al. (2019), "What Do Compressed Deep Neural Networks Forget?".

Inputs are predicted labels of two populations on the same N test samples: `preds_original (P, N)`
of P uncompressed members (seeds) and `preds_compressed (P', N)` of P' compressed ones, plus the true
`labels (N,)`. compax compresses each member of one trained population, so usually P' = P and member
i of both shares a seed, but the class test treats the populations as independent samples, as Hooker
et al. do with separately trained populations, so P != P' is allowed there.

- Class level: the normalised class accuracy of every member and a two-sided Welch t-test per class
  between the populations (`impacted_classes`), with an optional multiple-testing correction; a
  class whose recall did not change is untestable (`untestable_classes`), never impacted.
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


NORMALIZATIONS = ("subtract", "ratio")
TESTS = ("welch", "paired_t", "wilcoxon")


@functools.partial(jax.jit, static_argnames=("num_classes", "normalization", "own"))
def normalized_class_accuracy(labels, preds, num_classes: int, normalization: str = "subtract",
                              own: bool = False):
    """Class accuracy relative to the model's overall accuracy A[m] = mean_i [preds[m, i] = y_i], (P, C).

    "subtract" (Hooker et al. 2019's released code, `per_class_accuracy/gen_tstatistic.py`):
    a[m, c] - mean_m A[m], the class recall minus the population's mean top-1 accuracy at that
    level; with `own`, a[m, c] - A[m], each member's own accuracy (the paired tests: a
    population-wide constant leaves a near-zero-variance difference for a variant that changes
    almost nothing, and spurious significant classes). "ratio": a[m, c] / A[m] (each member's own
    accuracy, whatever `own`). Either way a class counts as impacted only if it changes more than
    the model as a whole. NaN for a class without samples.
    """
    labels, preds = jnp.asarray(labels), jnp.asarray(preds)
    overall = jnp.mean(preds == labels[None], axis=1)
    accuracy = class_accuracy(labels, preds, num_classes)
    if normalization == "ratio":
        return accuracy / overall[:, None]
    if normalization != "subtract":
        raise UserError(f"unknown normalisation {normalization!r}: use one of {', '.join(NORMALIZATIONS)}")
    return accuracy - (overall[:, None] if own else jnp.mean(overall))


def welch_t_test(sample_a, sample_b):
    """Two-sided Welch t-test per column of `sample_a (Pa, C)` against `sample_b (Pb, C)`: (t, p), (C,) each.

    t = (mean_a - mean_b) / sqrt(s_a^2/Pa + s_b^2/Pb) with s^2 the unbiased variances, Welch-Satterthwaite
    degrees of freedom nu = (s_a^2/Pa + s_b^2/Pb)^2 / ((s_a^2/Pa)^2/(Pa-1) + (s_b^2/Pb)^2/(Pb-1)) and
    p = 2 (1 - F_nu(|t|)), as `scipy.stats.ttest_ind(a, b, equal_var=False)` (the test of Hooker et al.
    2019). Where both samples of a column have zero variance t is 0/0 or x/0, which SciPy returns as
    NaN or as a precision-loss artefact (p ~ 1e-30); the stated rule instead (`_no_variance`): equal
    means give t = 0, p = 1 (no evidence); different means mean that every member of one sample lies
    above every member of the other, and p is the exact two-sided Mann-Whitney U p-value of that
    complete separation, 2 / binom(Pa + Pb, Pa) (1/3 for two members each), t = +-inf. Columns
    holding NaN give NaN. Float64, NumPy; Pa, Pb >= 2.
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
    separated = 2.0 / math.comb(size_a + size_b, size_a)  # exact Mann-Whitney, complete separation
    return _no_variance(t, p, difference, (error_a == 0) & (error_b == 0), min(1.0, separated))


def _no_variance(t, p, difference, no_variance, separated_p: float):
    """The t-tests' rule for columns whose variance estimate is zero (t undefined): t = 0, p = 1
    (no evidence) for a zero mean difference; otherwise t = +-inf and p = `separated_p`, the exact
    distribution-free p-value of the data's complete ordering (Mann-Whitney for Welch, the sign test
    for the paired t-test), so that a zero variance never yields p = 0 by accident."""
    t = np.where(no_variance, np.where(difference == 0, 0.0, np.copysign(np.inf, difference)), t)
    p = np.where(no_variance, np.where(difference == 0, 1.0, separated_p), p)
    return t, p


def _paired(sample_a, sample_b, test: str):
    sample_a, sample_b = np.asarray(sample_a, np.float64), np.asarray(sample_b, np.float64)
    if sample_a.shape != sample_b.shape or len(sample_a) < 2:
        raise UserError(f"the {test} test pairs member m of one population with member m of the other,"
                        f" got shapes {sample_a.shape} and {sample_b.shape}: pass 2 or more members"
                        " compressed from the same originals")
    return sample_a - sample_b


def paired_t_test(sample_a, sample_b):
    """Two-sided paired t-test per column of `sample_a (P, C)` against `sample_b (P, C)`: (t, p).

    With d = a - b per member: t = mean(d) / (s_d / sqrt(P)), s_d the unbiased standard deviation,
    P - 1 degrees of freedom, p = 2 (1 - F(|t|)), as `scipy.stats.ttest_rel`. Where s_d = 0 (t
    undefined; SciPy gives NaN or a precision-loss artefact): t = 0, p = 1 when mean(d) = 0 (no
    evidence), else all P differences are equal and of one sign, t = +-inf and p is the exact
    two-sided sign-test p-value 2^(1 - P) (`scipy.stats.binomtest(P, P)`; 0.5 for two members).
    Columns holding NaN give NaN. Float64, NumPy; P >= 2.
    """
    d = _paired(sample_a, sample_b, "paired t")
    count = len(d)
    mean, spread = d.mean(axis=0), d.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / (spread / np.sqrt(count))
    p = 2.0 * stats.t.sf(np.abs(t), count - 1)
    return _no_variance(t, p, mean, spread == 0, min(1.0, 2.0 ** (1 - count)))


def wilcoxon_signed_rank(sample_a, sample_b):
    """Two-sided Wilcoxon signed-rank test per column of the differences d = a - b, (P, C): (W, p).

    Zero differences are dropped (Wilcoxon's own rule, `zero_method="wilcox"`), W = min(W+, W-) the
    smaller signed-rank sum and p from `scipy.stats.wilcoxon` (exact for up to 50 non-zero
    differences without ties, the normal approximation otherwise). A column whose differences are
    all zero gets W = 0, p = 1; columns holding NaN give NaN.
    """
    d = _paired(sample_a, sample_b, "Wilcoxon signed-rank")
    statistic, p = np.full(d.shape[1], np.nan), np.full(d.shape[1], np.nan)
    for c in range(d.shape[1]):
        column = d[:, c]
        if np.isnan(column).any():
            continue
        if not column.any():
            statistic[c], p[c] = 0.0, 1.0
            continue
        result = stats.wilcoxon(column, zero_method="wilcox", alternative="two-sided")
        statistic[c], p[c] = result.statistic, result.pvalue
    return statistic, p


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

    mode_i = argmax_c #{m : preds[m, i] = c}, ties broken toward the largest label, as Hooker et
    al.'s released code (`pandas.DataFrame.mode().max()`); agreement_i = #{m : preds[m, i] = mode_i}
    / P. Hooker et al. (2019) compare these modes between populations. Predictions must lie in [0, C).
    """
    preds = jnp.asarray(preds)
    members, samples = preds.shape
    counts = jnp.zeros((samples, num_classes), jnp.int32)
    counts = counts.at[jnp.arange(samples)[None, :], preds].add(1, mode="drop")
    mode = num_classes - 1 - jnp.argmax(counts[:, ::-1], axis=1)  # the last maximum
    return mode.astype(jnp.int32), counts.max(axis=1) / members


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


def _correct_per_class(labels, preds, num_classes: int) -> np.ndarray:
    """Correct predictions per member and class, (P, C) int: the integer numerator of the recall."""
    return np.stack([np.bincount(labels[pred == labels], minlength=num_classes) for pred in preds])


def untestable_classes(labels, preds_original, preds_compressed, num_classes: int,
                       paired: bool) -> np.ndarray:
    """The classes on which a test of normalised class accuracy can only measure the whole model, (C,) bool.

    Hooker et al.'s normalisation, a[m, c] - A (or a[m, c] / A[m]), makes a class whose own recall
    a[m, c] did not change differ between the populations by exactly the change of the overall
    accuracy A. A t-test of that difference is a test of the model, not of the class, and with
    30 members (or with constant recalls, where the variance is zero) it is significant whenever
    the model's accuracy moved: a class that nothing changed would be reported as impacted. So a
    class is untestable, no evidence either way, when its recall carries no difference between
    the populations:
    - `paired` (member m of both populations is the same trained model): every member's recall of
      c is unchanged, #correct'[m, c] = #correct[m, c] for all m;
    - independent populations: the per-member recalls of c are the same multiset in both (equal
      sizes), or are one constant within each population and the same constant in both.
    Counts of correct predictions are compared, so "unchanged" is exact. A variance taken from the
    binomial sampling of the test set would not rescue these classes: at recall 0 or 1, the usual
    case (a class every member gets right, or none does), it is zero too. A class without test
    samples has no recall: it is untested (NaN) for that reason and not marked here. Untestable
    classes are left out of the tests and of the multiple-testing family and are listed apart
    (`impacted_classes`).
    """
    correct_original = _correct_per_class(labels, preds_original, num_classes)
    correct_compressed = _correct_per_class(labels, preds_compressed, num_classes)
    has_samples = np.bincount(labels, minlength=num_classes) > 0
    if paired:
        unchanged = np.all(correct_original == correct_compressed, axis=0)
    elif len(correct_original) == len(correct_compressed):
        unchanged = np.all(np.sort(correct_original, axis=0) == np.sort(correct_compressed, axis=0),
                           axis=0)
    else:
        constant = (np.ptp(correct_original, axis=0) == 0) & (np.ptp(correct_compressed, axis=0) == 0)
        unchanged = constant & (correct_original[0] == correct_compressed[0])
    return unchanged & has_samples


def impacted_classes(labels, preds_original, preds_compressed, num_classes: int, alpha: float = 0.05,
                     correction: str | None = None, normalization: str = "subtract",
                     test: str = "welch") -> dict:
    """The classes whose normalised accuracy differs significantly between the populations.

    Hooker et al. (2019): per class c a two-sided test of the normalised class accuracies
    (`normalized_class_accuracy`) of the compressed members against those of the original members;
    class c is impacted when its p-value, adjusted by `correction` over the tested classes
    (`adjust_p_values`), is <= alpha. `test`: "welch" (`welch_t_test`, Hooker's: independently
    trained populations, each normalised by its population's mean accuracy under "subtract"), or,
    for a population compressed member by member from the original one (member m of both shares a
    seed), "paired_t" (`paired_t_test`) or "wilcoxon" (`wilcoxon_signed_rank`) on the per-member
    differences, each member normalised by its own accuracy. A class without test samples, and an
    untestable class (`untestable_classes`: its recall did not change, so its normalised change is
    the model's; paired for the paired tests, as multisets for Welch), is not tested: t, p,
    p_adjusted NaN, never significant, not counted in the correction's family.

    Returns t (the test's statistic; Welch and paired t > 0: the compressed population is relatively
    better), p, p_adjusted (C,) float64, significant, untestable (C,) bool, significant_classes and
    untestable_classes (lists of ints), count, correction, alpha, normalization, test, and
    mean_original, mean_compressed (C,): the population means of the normalised class accuracy.
    """
    preds_original, preds_compressed, labels = _populations(preds_original, preds_compressed,
                                                            num_classes, labels)
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha={alpha} is outside (0, 1): pass a significance level such as 0.05")
    if test not in TESTS:
        raise UserError(f"unknown test {test!r}: use one of {', '.join(TESTS)}")
    own = test != "welch"
    original = np.asarray(normalized_class_accuracy(labels, preds_original, num_classes, normalization,
                                                    own), np.float64)
    compressed = np.asarray(normalized_class_accuracy(labels, preds_compressed, num_classes,
                                                      normalization, own), np.float64)
    run_test = {"welch": welch_t_test, "paired_t": paired_t_test, "wilcoxon": wilcoxon_signed_rank}[test]
    t, p = run_test(compressed, original)
    untestable = untestable_classes(labels, preds_original, preds_compressed, num_classes, own)
    t, p = np.where(untestable, np.nan, t), np.where(untestable, np.nan, p)
    tested = np.isfinite(p)
    p_adjusted = np.full(num_classes, np.nan)
    p_adjusted[tested] = adjust_p_values(p[tested], correction)
    significant = p_adjusted <= alpha
    return {"t": t, "p": p, "p_adjusted": p_adjusted, "significant": significant,
            "significant_classes": np.flatnonzero(significant).tolist(), "count": int(significant.sum()),
            "untestable": untestable, "untestable_classes": np.flatnonzero(untestable).tolist(),
            "correction": correction, "alpha": float(alpha), "normalization": normalization,
            "test": test, "mean_original": original.mean(axis=0),
            "mean_compressed": compressed.mean(axis=0)}


def impacted_counts(labels, preds_original, preds_compressed, num_classes: int, alpha: float,
                    tests, corrections) -> dict:
    """{test: {normalization: {correction or "none": number of impacted classes}}} for every test
    in `tests`, both normalisations and every correction in `corrections` (None: "none")."""
    counts = {}
    for test in tests:
        for normalization in NORMALIZATIONS:
            p = impacted_classes(labels, preds_original, preds_compressed, num_classes, alpha, None,
                                 normalization, test)["p"]
            tested = np.isfinite(p)
            counts.setdefault(test, {})[normalization] = {
                correction or "none": int(np.sum(adjust_p_values(p[tested], correction) <= alpha))
                for correction in corrections}
    return counts


def compression_identified_exemplars(preds_original, preds_compressed, num_classes: int,
                                     labels=None) -> dict:
    """Compression identified exemplars: samples whose modal label differs between the populations.

    Hooker et al. (2019) call them pruning identified exemplars (PIEs) for pruning: sample i is a CIE
    when mode_i(original) != mode_i(compressed), with the modal label of `modal_labels` (ties broken
    toward the largest label).

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
                       correction: str | None = None, width: float = 1.0,
                       normalization: str = "subtract", paired: bool = False,
                       min_effect: float = 0.01) -> dict:
    """The Hooker et al. (2019) statistics of one compressed population as a JSON-friendly dict.

    `paired`: the population was compressed member by member from the original one (post-training
    compression; P = P'), so the paired tests run beside Welch; otherwise it was trained on its own
    (e.g. gradual pruning from initialisation) and only Welch applies. `design` says which.
    From `impacted_classes` (Welch, `normalization`, `correction`): significant_classes, count,
    untestable_classes (recall unchanged: no evidence either way, `untestable_classes`),
    correction, alpha, normalization, and per class p, p_adjusted and normalized_accuracy_change =
    mean_compressed - mean_original (None where a class was not tested); the size of the effects
    found: median_abs_change (median |change| over the significant classes, None without any) and
    material_count (significant classes with |change| >= `min_effect`, a fraction: with 30
    members a paired test finds consistent shifts far below a point of accuracy, which a
    significance test alone counts as impacted; Hooker et al. use no floor). `paired_tests` (paired
    only): the same for "paired_t" and "wilcoxon". `counts`: `impacted_counts` for every test, both
    normalisations, without correction, with Holm's and with `correction`. From
    `compression_identified_exemplars`: pies (the CIE count), pie_share, pies_per_class. From
    `band_impacted_classes`, averaged over the members: band = {width, outside_original,
    outside_compressed, crossed (mean numbers of classes), crossing_share (per class, the share of
    members where it crossed), impacted_images}; band is None when P != P'.
    """
    if paired and len(preds_original) != len(preds_compressed):
        raise UserError(f"a paired design needs as many compressed as original members, got"
                        f" {len(preds_compressed)} and {len(preds_original)}")
    tests = TESTS if paired else ("welch",)

    def class_results(test):
        classes = impacted_classes(labels, preds_original, preds_compressed, num_classes, alpha,
                                   correction, normalization, test)
        change = classes["mean_compressed"] - classes["mean_original"]
        found = np.abs(change[classes["significant"]])
        return {"significant_classes": classes["significant_classes"], "count": classes["count"],
                "untestable_classes": classes["untestable_classes"],
                "p": _json_floats(classes["p"]), "p_adjusted": _json_floats(classes["p_adjusted"]),
                "normalized_accuracy_change": _json_floats(change),
                "median_abs_change": float(np.median(found)) if found.size else None,
                "material_count": int(np.sum(found >= min_effect))}

    exemplars = compression_identified_exemplars(preds_original, preds_compressed, num_classes, labels)
    summary = {**class_results("welch"), "design": "paired" if paired else "independent",
               "correction": correction, "alpha": float(alpha), "normalization": normalization,
               "min_effect": float(min_effect),
               "paired_tests": {test: class_results(test) for test in tests if test != "welch"},
               "counts": impacted_counts(labels, preds_original, preds_compressed, num_classes, alpha,
                                         tests, list(dict.fromkeys((None, "holm", correction)))),
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


def _accuracy_on(preds, labels, mask) -> float | None:
    """Mean over members of the accuracy on the samples of `mask` (None: no such sample)."""
    return float(np.mean(preds[:, mask] == labels[mask])) if mask.any() else None


def pie_claims(labels, preds_original, preds_compressed, num_classes: int, train_counts) -> dict:
    """Numbers behind Hooker et al.'s claims about PIEs (CIEs) and impacted classes, one variant.

    In sample (CIEs of the whole populations): the original and compressed populations' accuracy on
    the CIEs and on the other test samples, and the drop (original - compressed) on each.
    Held out (needs 4+ members in each population): the CIEs are found with the even-numbered
    members of both populations and the accuracies measured with the odd-numbered ones, so the
    "PIEs are harder" and "compression loses more on PIEs" claims are not true by construction.
    Class frequency: Spearman's rank correlation (rho, two-sided p) between each class's training
    frequency `train_counts (C,)` and its normalised accuracy change (`normalized_class_accuracy`,
    "subtract", population means, whose ranks are those of the class recall change); rho > 0 means
    rare classes lose more (claim 4 on GTSRB).
    """
    preds_original, preds_compressed, labels = _populations(preds_original, preds_compressed,
                                                            num_classes, labels)

    def split(cies, original, compressed):
        on = {"cies": int(cies.sum())}
        for name, mask in (("cies", cies), ("rest", ~cies)):
            before, after = _accuracy_on(original, labels, mask), _accuracy_on(compressed, labels, mask)
            on[f"original_accuracy_on_{name}"] = before
            on[f"compressed_accuracy_on_{name}"] = after
            on[f"drop_on_{name}"] = None if before is None else before - after
        return on

    def cie_mask(original, compressed):
        return compression_identified_exemplars(original, compressed, num_classes)["mask"]

    result = {"in_sample": split(cie_mask(preds_original, preds_compressed), preds_original,
                                 preds_compressed), "held_out": None}
    if min(len(preds_original), len(preds_compressed)) >= 4:
        found = cie_mask(preds_original[0::2], preds_compressed[0::2])
        result["held_out"] = split(found, preds_original[1::2], preds_compressed[1::2])
    # The subtracted mean accuracies are one constant for all classes: ranks as the recall change,
    # computed from integer counts so that equal changes tie exactly (P = P' here).
    if len(preds_original) == len(preds_compressed):
        with np.errstate(invalid="ignore", divide="ignore"):
            change = ((_correct_per_class(labels, preds_compressed, num_classes).sum(0)
                       - _correct_per_class(labels, preds_original, num_classes).sum(0))
                      / (len(preds_original) * np.bincount(labels, minlength=num_classes)))
    else:
        change = (np.asarray(class_accuracy(labels, preds_compressed, num_classes), np.float64).mean(0)
                  - np.asarray(class_accuracy(labels, preds_original, num_classes), np.float64).mean(0))
    counts = np.asarray(train_counts, np.float64)
    usable = np.isfinite(change)
    if usable.sum() >= 3 and np.ptp(change[usable]) > 0 and np.ptp(counts[usable]) > 0:
        rho, p = stats.spearmanr(counts[usable], change[usable])
        result["frequency_spearman"] = {"rho": float(rho), "p": float(p)}
    else:
        result["frequency_spearman"] = None
    return result


def spearman_exact(x, y) -> tuple[float, float]:
    """Spearman's rho of `x` and `y` with a two-sided p-value: exact for up to 8 pairs (the share of
    the n! orderings of `y` whose |rho| reaches the observed one), else `scipy.stats.spearmanr`'s
    t approximation (which gives p = 0 for a perfect rank order of 3 levels, where the exact
    p is 1/3)."""
    import itertools

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rho = float(stats.spearmanr(x, y).statistic)
    if len(x) > 8:
        return rho, float(stats.spearmanr(x, y).pvalue)
    permuted = [stats.spearmanr(x, y[list(order)]).statistic
                for order in itertools.permutations(range(len(y)))]
    return rho, float(np.mean(np.abs(permuted) >= abs(rho) - 1e-12))


def level_trend(levels, values) -> dict | None:
    """Spearman's rank correlation (rho, two-sided p, `spearman_exact`) of `values` with the
    compression `levels`, e.g. impacted classes or PIEs against sparsity (Hooker et al.'s claim
    that both grow with it); None with fewer than 3 levels or constant values."""
    levels, values = np.asarray(levels, np.float64), np.asarray(values, np.float64)
    if len(levels) < 3 or np.ptp(levels) == 0 or np.ptp(values) == 0:
        return None
    rho, p = spearman_exact(levels, values)
    return {"rho": rho, "p": p, "levels": levels.tolist(), "values": values.tolist()}
