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
the result.

Early stop and time to fool (`early_stop=True`, the default). Zee et al. report the time an attack
takes to fool a model; here it is the time until the attack has an optimised adversarial example
for the image, i.e. until the first c that fools the model has been optimised to a standstill:

  - within a search step, sample i stops when its objective has stalled: every P = ceil(max_iterations
    / 10) iterations k (k = 0, P, 2P, ...) its loss L_i(k) = ||x'_k - x||^2 + c max(Z_t - max_{j != t}
    Z_j + kappa, 0) is compared with L_i(k - P), and the step ends for i if L_i(k) > 0.9999 L_i(k - P)
    (the reference code's `ABORT_EARLY`, there on the batch's summed loss, here per sample);
  - the attack ends for sample i after the first search step in which some iterate fooled the model
    (later steps would only bisect c to shrink the perturbation); a sample never fooled runs all
    `binary_search_steps` steps, each until it stalls or reaches `max_iterations`.

The loops are `lax.while_loop`s that stop when every sample of the batch is done (samples done early
are masked meanwhile). Per sample the attack reports the iteration at which it was first fooled,

    first_fooled_i = min { k : Z_t(x'_k) - max_{j != t} Z_j(x'_k) < -kappa },

k counting the iterations (gradient evaluations) of all its search steps from 1, and `attack_population`
measures the time to fool as wall-clock seconds around the whole batch,

    seconds_per_image = T(batch, until every sample is done) / N,

the amortised time of one image when N are attacked at once, not the latency of a single image.
Stopping at the first successful c costs little in L2: the hinge at -kappa makes the objective an exact
penalty, so for any c above the model's threshold its minimiser lies on the boundary Z_t - max_j Z_j =
-kappa, the minimal perturbation for a linear model. With `early_stop=False` every sample runs all
`binary_search_steps` x `max_iterations` iterations (the reference code without its early abort).

The model is any `apply_fn(images01) -> logits`; `pixel_space_apply` makes it of a compressed variant,
normalising with the dataset's mean and std inside, so the box constraint is the valid image range.
Gradients through quantized variants (w8a8, w4a8, pruned_w8a8, dynamic_int8) come from the
straight-through estimator of fake quantization (`compax.compress.quant.fake_quant`): the gradient of
round() is taken as 1 where the value lies inside the clip range [qmin, qmax] and 0 where it was
clipped. Quantization can still mask gradients (piecewise-constant outputs, clipped activations), and
a masked gradient shows as attacks that fail, not as robustness: that is why `attack_summary` reports
the success rate next to the perturbation sizes.
"""

import inspect
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compax.compress import Compressed
from compax.errors import UserError
from compax.measure.taps import apply_with_cpu_convolutions
from compax.member_vmap import chunked_vmap, take_members

UPPER_BOUND = 1e10  # initial upper bound of c, as in the reference code
_TANH_SHRINK = 0.999999  # keeps arctanh of pixels at 0 and 1 finite, as in the reference code


def pixel_space_apply(model, compressed: Compressed, mean, std) -> Callable:
    """`apply_fn(images01) -> logits` of a variant for images in [0, 1]: the model sees
    (images01 - mean) / std per channel, as `compax.data.normalize` gives for uint8 images / 255."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return lambda images01: apply_with_cpu_convolutions(model, compressed, (images01 - mean) / std)


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
                      learning_rate: float = 0.01, initial_const: float = 1e-2,
                      early_stop: bool = True) -> dict:
    """Untargeted Carlini & Wagner (2017) L2 attack on a batch (see the module doc for the maths).

    `apply_fn(images01)` gives float logits (N, C) of images (N, H, W, C) in [0, 1]; `labels` (N,)
    are the true classes; `confidence` is kappa. Every sample has its own c and its own binary search;
    the batch shares one Adam (optax.adam(learning_rate)) on the summed objective, which is the same
    as one Adam per sample. With `early_stop` a sample stops at its time to fool (module doc: the
    step's optimisation stalls, and the attack ends after the first search step that fooled the
    model); without it every sample runs `binary_search_steps` x `max_iterations` iterations (the
    reference code without its early abort). Both loops are `lax.while_loop`s that end when every
    sample of the batch is done. jit- and vmap-compatible (`binary_search_steps`, `max_iterations`
    and `early_stop` are static under jit; vmapped over a population, a loop runs until every
    member is done); vmap it over a population of variants through `apply_fn`, e.g. with
    `make_population_attack`, or run `attack_population`.

    Returns `adversarial` (N, H, W, C) float32 in [0, 1], the smallest-L2 successful image per sample
    or the image itself where no iterate succeeded; `success` (N,) bool; `l2` (N,) float32, the
    distance ||adversarial - image||_2 (0 where the attack failed); `first_fooled` (N,) int32, the
    iteration (1-based, counted over all the sample's search steps) of its first successful iterate,
    -1 where none succeeded; `iterations` (N,) int32, the iterations the sample ran.
    """
    x = jnp.asarray(images01, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != x.shape[:1]:
        raise UserError(f"labels {labels.shape} do not match images {x.shape}: pass one true class per image")
    n = x.shape[0]
    pixel_axes = tuple(range(1, x.ndim))
    per_pixel = (-1,) + (1,) * len(pixel_axes)  # a per-sample mask broadcast over the pixels
    w_start = jnp.arctanh((2.0 * x - 1.0) * _TANH_SHRINK)
    tx = optax.adam(learning_rate)
    check_every = max(1, -(-max_iterations // 10))  # ceil: the reference checks every tenth

    def objective(w, const):
        adversarial = (jnp.tanh(w) + 1.0) / 2.0
        squared_l2 = jnp.sum((adversarial - x) ** 2, axis=pixel_axes)
        margin = true_class_margin(apply_fn(adversarial).astype(jnp.float32), labels)
        # The reference code's loss: f + kappa >= 0, so that the stall test compares like with like.
        loss = squared_l2 + const * jnp.maximum(margin + confidence, 0.0)
        return jnp.sum(loss), (loss, squared_l2, margin < -confidence, adversarial)

    def iteration(carry):
        (step_iteration, w, opt_state, const, running, previous_loss, fooled, best_l2, best,
         first_fooled, iterations) = carry
        (_, (loss, squared_l2, success, adversarial)), grad = jax.value_and_grad(
            objective, has_aux=True)(w, const)
        success = success & running
        better = success & (squared_l2 < best_l2)
        best_l2 = jnp.where(better, squared_l2, best_l2)
        best = jnp.where(better.reshape(per_pixel), adversarial, best)
        iterations = iterations + running
        first_fooled = jnp.where(success & (first_fooled < 0), iterations, first_fooled)
        updates, opt_state = tx.update(grad, opt_state, w)
        w = jnp.where(running.reshape(per_pixel), optax.apply_updates(w, updates), w)
        if early_stop:  # the reference code's abort, per sample: no 0.01% progress in a tenth
            check = step_iteration % check_every == 0
            stalled = check & (loss > 0.9999 * previous_loss)
            previous_loss = jnp.where(check, loss, previous_loss)
            running = running & ~stalled
        return (step_iteration + 1, w, opt_state, const, running, previous_loss, fooled | success,
                best_l2, best, first_fooled, iterations)

    def search_step(carry):
        step, const, lower, upper, done, best_l2, best, first_fooled, iterations = carry
        start = (jnp.int32(0), w_start, tx.init(w_start), const, ~done, jnp.full(n, jnp.inf, jnp.float32),
                 jnp.zeros(n, bool), best_l2, best, first_fooled, iterations)
        *_, fooled, best_l2, best, first_fooled, iterations = jax.lax.while_loop(
            lambda c: (c[0] < max_iterations) & jnp.any(c[4]), iteration, start)
        searched = next_const(const, lower, upper, fooled)
        const, lower, upper = (jnp.where(done, old, new) for old, new in
                               zip((const, lower, upper), searched, strict=True))
        if early_stop:
            done = done | fooled
        return step + 1, const, lower, upper, done, best_l2, best, first_fooled, iterations

    start = (jnp.int32(0), jnp.full(n, initial_const, jnp.float32), jnp.zeros(n, jnp.float32),
             jnp.full(n, UPPER_BOUND, jnp.float32), jnp.zeros(n, bool),
             jnp.full(n, jnp.inf, jnp.float32), x, jnp.full(n, -1, jnp.int32),
             jnp.zeros(n, jnp.int32))
    *_, best_l2, adversarial, first_fooled, iterations = jax.lax.while_loop(
        lambda c: (c[0] < binary_search_steps) & ~jnp.all(c[4]), search_step, start)
    l2 = jnp.sqrt(jnp.sum((adversarial - x) ** 2, axis=pixel_axes))
    return {"adversarial": adversarial, "success": jnp.isfinite(best_l2), "l2": l2,
            "first_fooled": first_fooled, "iterations": iterations}


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


def attack_population(model, population, mean, std, images01, labels, *, chunk: int = 1,
                      **settings) -> dict:
    """The Carlini-Wagner L2 attack on every member of `population`, summarised per member and as
    mean and std over members (Zee et al.'s robustness measures for a population of seeds).

    `population` is a `Compressed` (any variant) with a leading member axis; every member is attacked
    through `pixel_space_apply(model, member, mean, std)` on the same `images01` (N, H, W, C) in
    [0, 1] with true `labels` (N,); `settings` are the keyword arguments of `carlini_wagner_l2`
    (`early_stop` on by default). Members run `chunk` at a time, vmapped in one program compiled
    ahead of time (once per chunk size, so compilation is not timed), and each chunk is timed around
    its whole batch until its results are ready.

    Returns plain Python values and numpy arrays:

        members            [attack_summary of each member + seconds_per_image], in member order
        mean, std          {key: mean / std over members} of those summaries' numbers (std with
                           ddof 0, as compax's other population spreads; members with NaN, e.g. no
                           successful attack, are left out of that key; NaN if every member is)
        seconds_per_image  wall seconds of all chunks / (members x N): the mean time to fool
        arrays             {"success", "l2", "first_fooled", "iterations"}: (members, N) per image

    A member's seconds_per_image is its chunk's wall time / (members in the chunk x N), its own time
    to fool with chunk=1; vmapped chunks run until their slowest member is done.
    """
    known = set(inspect.signature(carlini_wagner_l2).parameters) - {"apply_fn", "images01", "labels"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f"unknown attack settings {unknown}: use keyword arguments of "
                        f"carlini_wagner_l2 ({', '.join(sorted(known))})")
    if chunk < 1:
        raise UserError(f"chunk must be >= 1 members at a time, got {chunk}")
    x = jnp.asarray(images01, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    members = jax.tree.leaves(population)[0].shape[0]

    def member_attack(compressed, images, true_labels):
        return carlini_wagner_l2(pixel_space_apply(model, compressed, mean, std), images,
                                 true_labels, **settings)

    def member_probs(compressed, images):
        logits = pixel_space_apply(model, compressed, mean, std)(images)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    attack = jax.jit(jax.vmap(member_attack, in_axes=(0, None, None)))
    probs = jax.jit(jax.vmap(member_probs))
    compiled, summaries, arrays, total_seconds = {}, [], [], 0.0
    for first in range(0, members, chunk):
        part = take_members(population, slice(first, min(first + chunk, members)))
        size = min(chunk, members - first)
        if size not in compiled:
            compiled[size] = attack.lower(part, x, labels).compile()
        started = time.perf_counter()
        result = jax.block_until_ready(compiled[size](part, x, labels))
        seconds = time.perf_counter() - started
        total_seconds += seconds
        result = jax.tree.map(np.asarray, result)
        probs_before = np.asarray(probs(part, jnp.broadcast_to(x, (size, *x.shape))))
        probs_after = np.asarray(probs(part, result["adversarial"]))
        for i in range(size):
            member = take_members(result, i)
            summaries.append({**_summarise(probs_before[i], probs_after[i], np.asarray(labels),
                                           member),
                              "seconds_per_image": seconds / (size * x.shape[0])})
            arrays.append({k: member[k] for k in ("success", "l2", "first_fooled", "iterations")})
    table = {key: np.array([s[key] for s in summaries], np.float64) for key in summaries[0]}
    return {
        "members": summaries,
        "mean": {key: _nan_reduce(np.mean, values) for key, values in table.items()},
        "std": {key: _nan_reduce(np.std, values) for key, values in table.items()},
        "seconds_per_image": total_seconds / (members * x.shape[0]),
        "arrays": {k: np.stack([a[k] for a in arrays]) for k in arrays[0]},
    }


def _nan_reduce(reduce, values: np.ndarray) -> float:
    """`reduce` of the finite `values` as a float, NaN if none is finite."""
    finite = values[np.isfinite(values)]
    return float(reduce(finite)) if finite.size else float("nan")


def attack_summary(apply_fn: Callable, images01, labels, result: dict) -> dict:
    """Accuracy, confidence and perturbation sizes before and after the attack (Zee et al.), as floats.

    accuracy_before / accuracy_after: share of samples classified correctly on the images / on
    `result["adversarial"]`; confidence_before / confidence_after: mean softmax probability of the
    true class; success_rate: share of the originally correctly classified samples the attack fooled
    (low values can mean masked gradients, see the module doc); mean_l2 / median_l2: of those
    successful perturbations (NaN when there are none, as success_rate when no sample was correct).
    Where `result` has them (`carlini_wagner_l2` gives them), also mean_iterations_to_fool /
    median_iterations_to_fool (`first_fooled` of those fooled samples, NaN when none) and
    mean_iterations (iterations run per sample, all samples).
    """
    labels = np.asarray(labels)
    if result["adversarial"].shape != np.shape(images01) or result["success"].shape != labels.shape:
        raise UserError(f"attack result for {result['adversarial'].shape} images does not match images "
                        f"{np.shape(images01)} and labels {labels.shape}: pass the images that were attacked")
    predict = jax.jit(lambda x: jax.nn.softmax(apply_fn(x).astype(jnp.float32), axis=-1))
    probs_before = np.asarray(predict(jnp.asarray(images01, jnp.float32)))
    probs_after = np.asarray(predict(result["adversarial"]))
    return _summarise(probs_before, probs_after, labels, result)


def _summarise(probs_before: np.ndarray, probs_after: np.ndarray, labels: np.ndarray,
               result: dict) -> dict:
    """`attack_summary` from the softmax probabilities (N, C) before and after the attack."""
    correct = probs_before.argmax(-1) == labels
    fooled = correct & np.asarray(result["success"])
    l2 = np.asarray(result["l2"])[fooled]
    rows = np.arange(len(labels))
    summary = {
        "samples": len(labels),
        "accuracy_before": float(correct.mean()),
        "accuracy_after": float((probs_after.argmax(-1) == labels).mean()),
        "confidence_before": float(probs_before[rows, labels].mean()),
        "confidence_after": float(probs_after[rows, labels].mean()),
        "success_rate": float(fooled.sum() / correct.sum()) if correct.any() else float("nan"),
        "mean_l2": float(l2.mean()) if l2.size else float("nan"),
        "median_l2": float(np.median(l2)) if l2.size else float("nan"),
    }
    if "first_fooled" in result:
        to_fool = np.asarray(result["first_fooled"])[fooled].astype(np.float64)
        summary.update(
            mean_iterations_to_fool=float(to_fool.mean()) if to_fool.size else float("nan"),
            median_iterations_to_fool=float(np.median(to_fool)) if to_fool.size else float("nan"),
            mean_iterations=float(np.mean(result["iterations"])))
    return summary
