"""Robustness to the Carlini & Wagner (2017) L2 attack, for every compressed variant (Zee et al.).

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks" (IEEE S&P 2017), untargeted
L2 attack on logits Z, with t the true label and images x in pixel space [0, 1]:

    x'(w) = (tanh(w) + 1) / 2                       (change of variables: x' stays in the box [0, 1])
    minimise over w    ||x'(w) - x||_2^2 + c * f(x'(w))
    f(x') = max(Z_t(x') - max_{i != t} Z_i(x'), -kappa)

`f` is the paper's f_6 written for the untargeted case: it reaches its minimum -kappa once some other
class beats the true one by kappa (the `confidence`). As in the paper's reference code
(github.com/carlini/nn_robust_attacks, l2_attack.py), for each sample w starts at
arctanh((2x - 1) * 0.999999), Adam minimises the objective for `max_iterations` steps (a fresh
optimiser and start for every c), and a binary search over c runs `binary_search_steps` times per
sample: c starts at `initial_const`; after a step in which some iterate succeeded, the upper bound
becomes min(upper, c), otherwise the lower bound becomes max(lower, c); c is then the middle of the
bounds, or, while no c has succeeded (upper bound still 1e10), ten times c. An iterate succeeds when
max_{i != t} Z_i - Z_t > kappa, and the successful iterate with the smallest L2 over all steps is
the result. The reference code's early abort is left out, so every sample runs the same fixed number
of steps (deterministic, and one compiled loop for a whole population).

The model is any `apply_fn(images01) -> logits`; `pixel_space_apply` makes it of a compressed variant,
normalising with the dataset's mean and std inside, so the box constraint is the valid image range.
Gradients through quantized variants (w8a8, w4a8, pruned_w8a8, dynamic_int8) come from the
straight-through estimator of fake quantization (`compax.compress.quant.fake_quant`): the gradient of
round() is taken as 1 where the value lies inside the clip range [qmin, qmax] and 0 where it was
clipped. Quantization can still mask gradients (piecewise-constant outputs, clipped activations), and
a masked gradient shows as attacks that fail, not as robustness: that is why `attack_summary` reports
the success rate next to the perturbation sizes.
"""

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compax.compress import Compressed, apply_compressed
from compax.errors import UserError
from compax.population import chunked_vmap

UPPER_BOUND = 1e10  # initial upper bound of c, as in the reference code
_TANH_SHRINK = 0.999999  # keeps arctanh of pixels at 0 and 1 finite, as in the reference code


def pixel_space_apply(model, compressed: Compressed, mean, std) -> Callable:
    """`apply_fn(images01) -> logits` of a variant for images in [0, 1]: the model sees
    (images01 - mean) / std per channel, as `compax.data.normalize` gives for uint8 images / 255."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return lambda images01: apply_compressed(model, compressed, (images01 - mean) / std)


def true_class_margin(logits, labels):
    """Z_t - max_{i != t} Z_i per sample, for logits (N, C) and labels (N,): minus the untargeted
    f of Carlini & Wagner (2017) before clipping at -kappa."""
    is_true = jnp.arange(logits.shape[-1])[None, :] == labels[:, None]
    true = jnp.sum(jnp.where(is_true, logits, 0.0), axis=-1)
    return true - jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=-1)


def next_const(const, lower, upper, succeeded):
    """(c, lower, upper) after a binary-search step, per sample (Carlini & Wagner's reference code).

    After a success: upper = min(upper, c); otherwise lower = max(lower, c). Then c = (lower + upper)
    / 2 once some c has succeeded (upper < 1e9), else c stays after a success and grows tenfold after a
    failure.
    """
    upper = jnp.where(succeeded, jnp.minimum(upper, const), upper)
    lower = jnp.where(succeeded, lower, jnp.maximum(lower, const))
    const = jnp.where(upper < 1e9, (lower + upper) / 2.0, jnp.where(succeeded, const, const * 10.0))
    return const, lower, upper


def carlini_wagner_l2(apply_fn: Callable, images01, labels, *, confidence: float = 0.0,
                      binary_search_steps: int = 5, max_iterations: int = 100,
                      learning_rate: float = 0.01, initial_const: float = 1e-2) -> dict:
    """Untargeted Carlini & Wagner (2017) L2 attack on a batch (see the module doc for the maths).

    `apply_fn(images01)` gives float logits (N, C) of images (N, H, W, C) in [0, 1]; `labels` (N,)
    are the true classes; `confidence` is kappa. Every sample has its own c and its own binary search;
    the batch shares one Adam (optax.adam(learning_rate)) on the summed objective, which is the same
    as one Adam per sample. jit- and vmap-compatible (`binary_search_steps` and `max_iterations` are
    loop counts: static under jit); vmap it over a population of variants through `apply_fn`, e.g.
    with `make_population_attack`.

    Returns `adversarial` (N, H, W, C) float32 in [0, 1], the smallest-L2 successful image per sample
    or the image itself where no iterate succeeded; `success` (N,) bool; `l2` (N,) float32, the
    distance ||adversarial - image||_2 (0 where the attack failed).
    """
    x = jnp.asarray(images01, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != x.shape[:1]:
        raise UserError(f"labels {labels.shape} do not match images {x.shape}: pass one true class per image")
    pixel_axes = tuple(range(1, x.ndim))
    w_start = jnp.arctanh((2.0 * x - 1.0) * _TANH_SHRINK)
    tx = optax.adam(learning_rate)

    def objective(w, const):
        adversarial = (jnp.tanh(w) + 1.0) / 2.0
        squared_l2 = jnp.sum((adversarial - x) ** 2, axis=pixel_axes)
        margin = true_class_margin(apply_fn(adversarial).astype(jnp.float32), labels)
        loss = squared_l2 + const * jnp.maximum(margin, -confidence)
        return jnp.sum(loss), (squared_l2, margin < -confidence, adversarial)

    def iteration(_, carry):
        w, opt_state, const, best_l2, best, succeeded = carry
        (_, (squared_l2, success, adversarial)), grad = jax.value_and_grad(
            objective, has_aux=True)(w, const)
        better = success & (squared_l2 < best_l2)
        best_l2 = jnp.where(better, squared_l2, best_l2)
        best = jnp.where(better.reshape((-1,) + (1,) * len(pixel_axes)), adversarial, best)
        updates, opt_state = tx.update(grad, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, const, best_l2, best, succeeded | success

    def search_step(_, carry):
        const, lower, upper, best_l2, best = carry
        start = (w_start, tx.init(w_start), const, best_l2, best, jnp.zeros(x.shape[0], bool))
        *_, best_l2, best, succeeded = jax.lax.fori_loop(0, max_iterations, iteration, start)
        return *next_const(const, lower, upper, succeeded), best_l2, best

    n = x.shape[0]
    start = (jnp.full(n, initial_const, jnp.float32), jnp.zeros(n, jnp.float32),
             jnp.full(n, UPPER_BOUND, jnp.float32), jnp.full(n, jnp.inf, jnp.float32), x)
    *_, best_l2, adversarial = jax.lax.fori_loop(0, binary_search_steps, search_step, start)
    l2 = jnp.sqrt(jnp.sum((adversarial - x) ** 2, axis=pixel_axes))
    return {"adversarial": adversarial, "success": jnp.isfinite(best_l2), "l2": l2}


def make_population_attack(model, mean, std, *, chunk: int, **attack_options) -> Callable:
    """`attack(population, images01, labels) -> dict` of `carlini_wagner_l2` for every member.

    `population` is a `Compressed` with a leading member axis (any variant); each member is attacked
    through `pixel_space_apply(model, member, mean, std)` on the same images, `chunk` members vmapped
    at a time (`chunked_vmap`, jit-compiled once per variant). The results have a leading member axis.
    `attack_options` are the keyword arguments of `carlini_wagner_l2`.
    """
    def member_attack(compressed, images01, labels):
        return carlini_wagner_l2(pixel_space_apply(model, compressed, mean, std), images01, labels,
                                 **attack_options)

    return chunked_vmap(member_attack, chunk, num_member_args=1)


def attack_seconds_per_sample(attack: Callable, population, images01, labels) -> float:
    """Wall-clock seconds of `attack(population, images01, labels)` per member and sample.

    The attack runs once to compile, then once more timed until its results are ready; the time is
    divided by members x samples, so it is the amortised cost of one attack when a whole batch (and
    population) runs at once, not the latency of attacking one image alone.
    """
    jax.block_until_ready(attack(population, images01, labels))
    start = time.perf_counter()
    jax.block_until_ready(attack(population, images01, labels))
    members = jax.tree.leaves(population)[0].shape[0]
    return (time.perf_counter() - start) / (members * np.shape(labels)[0])


def attack_summary(apply_fn: Callable, images01, labels, result: dict) -> dict:
    """Accuracy, confidence and perturbation sizes before and after the attack (Zee et al.), as floats.

    accuracy_before / accuracy_after: share of samples classified correctly on the images / on
    `result["adversarial"]`; confidence_before / confidence_after: mean softmax probability of the
    true class; success_rate: share of the originally correctly classified samples the attack fooled
    (low values can mean masked gradients, see the module doc); mean_l2 / median_l2: of those
    successful perturbations (NaN when there are none, as success_rate when no sample was correct).
    """
    labels = np.asarray(labels)
    if result["adversarial"].shape != np.shape(images01) or result["success"].shape != labels.shape:
        raise UserError(f"attack result for {result['adversarial'].shape} images does not match images "
                        f"{np.shape(images01)} and labels {labels.shape}: pass the images that were attacked")
    predict = jax.jit(lambda x: jax.nn.softmax(apply_fn(x).astype(jnp.float32), axis=-1))
    probs_before = np.asarray(predict(jnp.asarray(images01, jnp.float32)))
    probs_after = np.asarray(predict(result["adversarial"]))
    correct = probs_before.argmax(-1) == labels
    fooled = correct & np.asarray(result["success"])
    l2 = np.asarray(result["l2"])[fooled]
    rows = np.arange(len(labels))
    return {
        "samples": len(labels),
        "accuracy_before": float(correct.mean()),
        "accuracy_after": float((probs_after.argmax(-1) == labels).mean()),
        "confidence_before": float(probs_before[rows, labels].mean()),
        "confidence_after": float(probs_after[rows, labels].mean()),
        "success_rate": float(fooled.sum() / correct.sum()) if correct.any() else float("nan"),
        "mean_l2": float(l2.mean()) if l2.size else float("nan"),
        "median_l2": float(np.median(l2)) if l2.size else float("nan"),
    }
