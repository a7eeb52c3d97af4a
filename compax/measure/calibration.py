"""Confidence in the target class and calibration of an original and a compressed classifier.

Schwaiger et al. (2022, Figs. 2-3) compare the softmax confidence in the true class before and after
compression, split by whether the prediction changed; Mantowsky et al. ("DNN Pruning and Its Effects
on Robustness") compare the expected calibration error (ECE) of Guo et al. (2017, "On Calibration of
Modern Neural Networks").

All functions take float logits (N, C) and integer labels (N,) in [0, C), are `jit`-compatible
(with `num_bins`, `quantile_levels` and `large_change` static) and `vmap`-compatible over a leading
member axis of the logits, e.g. `jax.vmap(expected_calibration_error, in_axes=(0, None))`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from compax.errors import UserError

QUANTILE_LEVELS = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def _check_logits(logits, labels, what: str = "logits"):
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise UserError(f"{what} {logits.shape} and labels {labels.shape} do not match: pass logits "
                        "of shape (N, C) and integer labels of shape (N,)")


@jax.jit
def target_confidence(logits, labels):
    """p_i = softmax(logits_i)[labels_i], the probability given to the true class, shape (N,)."""
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_logits(logits, labels)
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(probabilities, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _masked_summary(values, mask, quantile_levels, large_change):
    """count, mean, std (ddof=0), quantiles and share with |value| > large_change over values[mask];
    every statistic but the count is NaN when the mask is empty."""
    count = mask.sum(dtype=jnp.int32)
    nonempty = count > 0
    safe_count = jnp.maximum(count, 1).astype(jnp.float32)

    def mean_of(x):
        return jnp.where(nonempty, jnp.where(mask, x, 0.0).sum() / safe_count, jnp.nan)

    mean = mean_of(values)
    return {
        "count": count,
        "mean": mean,
        "std": jnp.sqrt(mean_of((values - jnp.where(nonempty, mean, 0.0)) ** 2)),
        "quantiles": jnp.nanquantile(jnp.where(mask, values, jnp.nan), jnp.asarray(quantile_levels)),
        "share_large_change": mean_of((jnp.abs(values) > large_change).astype(jnp.float32)),
    }


@functools.partial(jax.jit, static_argnames=("quantile_levels", "large_change"))
def confidence_change(logits_original, logits_compressed, labels,
                      quantile_levels: tuple = QUANTILE_LEVELS, large_change: float = 0.1) -> dict:
    """Change of the confidence in the target class, d_i = p_i(compressed) - p_i(original).

    Schwaiger et al. (2022, Figs. 2-3): samples keeping their argmax prediction mostly keep their
    confidence, changed predictions come with large confidence changes. Returns
    "diff" (N,) float32 = d, "same_prediction" (N,) bool (argmax of both logits equal; ties take the
    first class), and for the groups "all", "same" and "different" (prediction) a dict of jnp
    values: count (int32), mean, std (population, ddof=0), quantiles at `quantile_levels` (linear
    interpolation as numpy's default; 0.5 is the median) and share_large_change = share of the
    group with |d| > `large_change`. A group without samples has count 0 and NaN for every other
    statistic (no division by zero happens: the NaN is set explicitly).
    """
    logits_original, logits_compressed = jnp.asarray(logits_original), jnp.asarray(logits_compressed)
    labels = jnp.asarray(labels)
    _check_logits(logits_original, labels, "logits_original")
    _check_logits(logits_compressed, labels, "logits_compressed")
    if logits_original.shape != logits_compressed.shape:
        raise UserError(f"logits_original {logits_original.shape} and logits_compressed "
                        f"{logits_compressed.shape} differ: pass both models' logits for the same samples")
    diff = target_confidence(logits_compressed, labels) - target_confidence(logits_original, labels)
    same = jnp.argmax(logits_original, axis=-1) == jnp.argmax(logits_compressed, axis=-1)
    groups = {"all": jnp.ones_like(same), "same": same, "different": ~same}
    return {"diff": diff, "same_prediction": same,
            **{name: _masked_summary(diff, mask, quantile_levels, large_change)
               for name, mask in groups.items()}}


def _bin_edges(num_bins: int):
    """Edges float32(i / M), i = 0..M, rounded from float64 (jnp.linspace can be an ulp off)."""
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise UserError(f"num_bins={num_bins!r} is not a positive int: pass a number of bins such as 15")
    return jnp.asarray(np.arange(num_bins + 1) / num_bins, jnp.float32)


@functools.partial(jax.jit, static_argnames="num_bins")
def confidence_bins(confidences, correct, num_bins: int = 15) -> dict:
    """Reliability-diagram bins of Guo et al. (2017) from per-sample confidences and correctness.

    Bin b (b = 0..M-1) holds the samples with confidence in (e_b, e_{b+1}] (right-closed), with edges
    e_b = float32(b / M); a confidence of exactly 0 goes to bin 0 (as torch.bucketize with
    right=False, clipped). Returns (M,) arrays: count (int32), confidence (mean confidence) and
    accuracy (mean of `correct`), both 0 for empty bins; and edges (M + 1,).
    """
    confidences = jnp.asarray(confidences, jnp.float32)
    correct = jnp.asarray(correct).astype(jnp.float32)
    if confidences.ndim != 1 or confidences.shape != correct.shape:
        raise UserError(f"confidences {confidences.shape} and correct {correct.shape} differ: pass one "
                        "confidence and one correctness flag per sample, both of shape (N,)")
    edges = _bin_edges(num_bins)
    bins = jnp.clip(jnp.searchsorted(edges, confidences, side="left") - 1, 0, num_bins - 1)
    count = jnp.zeros(num_bins, jnp.int32).at[bins].add(1)
    safe_count = jnp.maximum(count, 1).astype(jnp.float32)
    return {
        "count": count,
        "confidence": jnp.zeros(num_bins, jnp.float32).at[bins].add(confidences) / safe_count,
        "accuracy": jnp.zeros(num_bins, jnp.float32).at[bins].add(correct) / safe_count,
        "edges": edges,
    }


@functools.partial(jax.jit, static_argnames="num_bins")
def calibration_bins(logits, labels, num_bins: int = 15) -> dict:
    """`confidence_bins` of the top-label confidence max_c softmax(logits_i)_c and correctness
    argmax_c logits_i = labels_i (Guo et al. 2017, reliability diagrams)."""
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_logits(logits, labels)
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    correct = jnp.argmax(logits, axis=-1) == labels
    return confidence_bins(probabilities.max(axis=-1), correct, num_bins)


def _bin_gaps(bins):
    """|acc_b - conf_b| per bin, and each bin's share |B_b| / N of the samples (0 when N = 0)."""
    total = bins["count"].sum()
    share = bins["count"].astype(jnp.float32) / jnp.maximum(total, 1).astype(jnp.float32)
    return jnp.abs(bins["accuracy"] - bins["confidence"]), share


@functools.partial(jax.jit, static_argnames="num_bins")
def expected_calibration_error(logits, labels, num_bins: int = 15):
    """ECE = sum_b |B_b| / N |acc(B_b) - conf(B_b)| over the bins of `calibration_bins`.

    Guo et al. (2017), eq. 3; the calibration measure Mantowsky et al. compare before and after
    pruning. A float32 scalar in [0, 1].
    """
    gaps, share = _bin_gaps(calibration_bins(logits, labels, num_bins))
    return (share * gaps).sum()


@functools.partial(jax.jit, static_argnames="num_bins")
def maximum_calibration_error(logits, labels, num_bins: int = 15):
    """MCE = max_b |acc(B_b) - conf(B_b)| over the non-empty bins of `calibration_bins`.

    Guo et al. (2017), eq. 5. A float32 scalar in [0, 1]; 0 when there are no samples.
    """
    gaps, share = _bin_gaps(calibration_bins(logits, labels, num_bins))
    return jnp.where(share > 0, gaps, 0.0).max()
