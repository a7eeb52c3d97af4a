"""Saliency maps of any compressed variant, and how compression changes them.

Simonyan, Vedaldi & Zisserman (2014), "Deep Inside Convolutional Networks": the saliency of image x
for class t is |d y_t / d x| with y_t the class's logit, reduced over colour channels by the maximum.
Schwaiger et al. (2022, "Beyond Test Accuracy") normalise each map to [0, 1], average-pool it 3x3
with stride 3, and compare an original with its compressed model by the mean absolute deviation
(MAD) of the pooled maps, listing the most changed samples; they could not compute saliency for
quantized models, as PyTorch's quantized tensors have no gradients. Mantowsky et al. ("DNN Pruning
and Its Effects on Robustness") compare maps by the heatmap correlation coefficient (HCC), the
Pearson correlation of the two maps. The share of saliency inside the object's bounding box (GTSRB
boxes) says whether attention stays on the object.

Maps are (N, H, W) float32 in [0, 1]; every function but `most_changed` is jnp, jit- and
vmap-compatible (over a population member axis of the maps or of the `Compressed` pytree).
"""

import jax
import jax.numpy as jnp
import numpy as np

from compax.compress import Compressed
from compax.errors import UserError
from compax.measure.taps import apply_with_cpu_convolutions, images_and_targets, map_batches


def normalized_per_image(maps):
    """maps (N, H, W) divided by each map's maximum, so that every map lies in [0, 1]; a map that
    is zero everywhere stays zero."""
    peak = jnp.max(maps, axis=(1, 2), keepdims=True)
    return maps / jnp.where(peak > 0, peak, 1.0)


def saliency_maps(model, compressed: Compressed, x, targets, batch_size: int = 256):
    """S_i = max_c |d y_{t_i}(x_i) / d x_i[:, :, c]| / max over pixels (Simonyan et al. 2014), (N, H, W).

    `x` are normalised images (N, H, W, C), `targets` (N,) integer classes t_i and y_t the variant's
    logit for class t. For quantized variants (w8a8, w4a8, pruned_w8a8) the gradient passes the
    fake quantization of every activation through its straight-through estimator (1 inside the
    clip range, 0 where clipped), the gradient Schwaiger et al. could not compute with PyTorch's
    quantized tensors; float16 / bfloat16 variants differentiate in their precision. Runs
    `batch_size` images at a time (`lax.map`); jit- and vmap-compatible over `compressed`. On a
    CPU, variants without activation quantization run their small convolutions on the kernels of
    `compax.kernels` (`taps.cpu_convolutions_for`), forward and input gradient.
    """
    x, targets = images_and_targets(x, targets)

    def batch_maps(images, labels):
        def target_logits(images):
            logits = apply_with_cpu_convolutions(model, compressed, images)
            return jnp.take_along_axis(logits, labels[:, None], axis=1).sum()

        gradient = jax.grad(target_logits)(images)
        return normalized_per_image(jnp.max(jnp.abs(gradient), axis=-1))

    return map_batches(batch_maps, batch_size, x, targets)


def pooled(maps, size: int = 3, stride: int = 3):
    """Average pooling of maps (N, H, W) over size x size windows with `stride`, VALID padding
    (32 -> 10 for 3 / 3), as Schwaiger et al. pool maps before comparing them."""
    window, strides = (1, size, size), (1, stride, stride)
    return jax.lax.reduce_window(maps, 0.0, jax.lax.add, window, strides, "VALID") / (size * size)


def mean_absolute_deviation(maps_a, maps_b):
    """MAD_i = mean over pooled pixels p of |P(a_i)_p - P(b_i)_p|, P = `pooled` (Schwaiger et al.),
    shape (N,)."""
    return jnp.mean(jnp.abs(pooled(maps_a) - pooled(maps_b)), axis=(1, 2))


def heatmap_correlation(maps_a, maps_b):
    """HCC_i = Pearson correlation of maps a_i and b_i over their pixels (Mantowsky et al.), (N,).

    HCC = sum (a - mean a)(b - mean b) / sqrt(sum (a - mean a)^2 sum (b - mean b)^2). It is
    undefined, and NaN here as in scipy.stats.pearsonr, where either map is constant (e.g. a model
    whose gradient vanishes).
    """
    a = maps_a.reshape(maps_a.shape[0], -1)
    b = maps_b.reshape(maps_b.shape[0], -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norm = jnp.sqrt(jnp.sum(a * a, axis=1) * jnp.sum(b * b, axis=1))
    return jnp.where(norm > 0, jnp.sum(a * b, axis=1) / jnp.where(norm > 0, norm, 1.0), jnp.nan)


def box_coverage(boxes, height: int, width: int):
    """Share of each pixel inside each box, (N, H, W): pixel (r, c) covers [c, c + 1) x [r, r + 1)
    and box (x1, y1, x2, y2) covers [x1, x2) x [y1, y2), so fractional boxes weigh border pixels by
    their overlap (integer boxes give 1 inside, 0 outside)."""
    boxes = jnp.asarray(boxes, jnp.float32)

    def overlap(low, high, size):
        start = jnp.arange(size, dtype=jnp.float32)
        return jnp.clip(jnp.minimum(start + 1, high[:, None]) - jnp.maximum(start, low[:, None]), 0, 1)

    rows = overlap(boxes[:, 1], boxes[:, 3], height)
    cols = overlap(boxes[:, 0], boxes[:, 2], width)
    return rows[:, :, None] * cols[:, None, :]


def roi_saliency_mass(maps, boxes):
    """m_i = sum_p w_ip S_ip / sum_p S_ip, the share of saliency inside the object box, (N,).

    `boxes` (N, 4) are x1, y1, x2, y2 in pixels with x2, y2 exclusive, possibly fractional; w_ip is
    pixel p's fractional coverage by the box (`box_coverage`). NaN for a map that is zero everywhere.
    """
    inside = jnp.sum(box_coverage(boxes, *maps.shape[1:]) * maps, axis=(1, 2))
    total = jnp.sum(maps, axis=(1, 2))
    return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), jnp.nan)


def most_changed(mad, k: int = 20) -> np.ndarray:
    """Indices of the k samples with the largest MAD, largest first (ties by index), as
    Schwaiger et al. show the 20 most changed saliency maps."""
    mad = np.asarray(mad)
    return np.argsort(-mad, kind="stable")[:k]


def compare_saliency(maps_original, maps_compressed, boxes=None) -> dict:
    """Per-sample and mean differences between the maps of an original and a compressed model.

    mad, hcc (N,): `mean_absolute_deviation`, `heatmap_correlation`; mad_mean, hcc_mean their means
    (hcc_mean over the samples where HCC is defined). With `boxes` (N, 4): roi_mass_original and
    roi_mass_compressed, the mean share of saliency inside the box (`roi_saliency_mass`), and
    roi_saliency_mass_change, the mean over samples of compressed minus original share (NaN shares
    left out). jit- and vmap-compatible.
    """
    if maps_original.shape != maps_compressed.shape or maps_original.ndim != 3:
        raise UserError(f"saliency maps {maps_original.shape} and {maps_compressed.shape} differ: "
                        "pass maps (N, H, W) of the same images")
    mad = mean_absolute_deviation(maps_original, maps_compressed)
    hcc = heatmap_correlation(maps_original, maps_compressed)
    result = {"mad": mad, "hcc": hcc, "mad_mean": jnp.mean(mad), "hcc_mean": jnp.nanmean(hcc)}
    if boxes is not None:
        if boxes.shape != (maps_original.shape[0], 4):
            raise UserError(f"boxes {boxes.shape} do not match {maps_original.shape[0]} maps: pass the "
                            "(N, 4) boxes of the same images (Split.boxes)")
        original = roi_saliency_mass(maps_original, boxes)
        compressed = roi_saliency_mass(maps_compressed, boxes)
        result.update(roi_mass_original=jnp.nanmean(original),
                      roi_mass_compressed=jnp.nanmean(compressed),
                      roi_saliency_mass_change=jnp.nanmean(compressed - original))
    return result
