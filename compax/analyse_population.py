"""Every analysis of `config.analysis.analyses` for every variant against the uncompressed population.

Per-member analyses run vmapped over the member axis (`chunked_vmap` for the model evaluations,
`jax.vmap` for the statistics) and are summarised as the mean over members; what the figures show
of single samples (the most changed saliency maps, confidence histograms, t-SNE, attacks) is taken
from member 0, the model of `config.seed`. Population statistics (Hooker et al.) need at least two
members.

Returns (summary, arrays): `summary["variants"][name]` adds to results.json (see pipeline.py)

    accuracy_diff_pp (from compress), disagreement, flips {right_before, right_after, wrong_both},
    max_class_acc_change_pp, max_confusion_change_pp, largest_confusion_changes [...],
    frequency_bias {spearman_rho, p_value}, macro_f1, macro_f1_diff,
    ece, delta_ece, confidence_diff {all, same, different: {count, mean, std, ...}},
    saliency_mad_mean, hcc_mean, roi_saliency_mass, roi_saliency_mass_change,
    gradcam_mad_mean, gradcam_hcc_mean, tsne_silhouette, attack {...},
    cie {significant_classes, count, pies, pie_share, ...}, band {...}

Scalars are means over members: max_class_acc_change_pp is the mean of each member's signed
largest class change (members whose largest changes have opposite signs partly cancel), while
largest_class_changes / largest_confusion_changes rank the member-mean changes. `arrays` (numpy,
keyed "<variant>.<name>") are what the report draws.
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from compax.analysis import attacks, calibration, classes, embeddings, gradcam, hooker, saliency
from compax.compress import apply_compressed
from compax.data import Dataset, normalize
from compax.distributed import to_host
from compax.errors import UserError
from compax.population import chunked_vmap, make_predict, take_members

SHOWCASE = 8
CORRECTIONS = ("none", "bonferroni", "holm", "fdr_bh")  # of the Welch tests' p-values
ANALYSES = ("classes", "calibration", "saliency", "gradcam", "hooker", "embeddings", "attacks")


def parse_analyses(text: str) -> tuple[str, ...]:
    """The analyses named in a comma-separated `--config.analysis.analyses` value."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in ANALYSES]
    if unknown:
        raise UserError(f"unknown analysis {unknown[0]!r} in --config.analysis.analyses: use a"
                        f" comma-separated subset of {','.join(ANALYSES)}")
    return names


def _mean(tree):
    """Mean over the member axis of every array in `tree`, as plain floats / lists."""
    return jax.tree.map(lambda a: np.asarray(jnp.nanmean(jnp.asarray(a, jnp.float32), 0)).tolist(),
                        tree)


def _finite(a: np.ndarray):
    """`a` as plain floats / lists with NaN (an empty group) as None, which JSON can hold."""
    if a.ndim == 0:
        return a.item() if np.isfinite(a) else None
    return [_finite(x) for x in a]


def _subset(count: int, total: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` test images (0 or >= total: all), fixed by the seed."""
    if count <= 0 or count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))


class PopulationAnalysis:
    """The test set, the original population's outputs, and the analyses of one variant at a time."""

    def __init__(self, config: ml_collections.ConfigDict, dataset: Dataset, model, original,
                 chunk: int):
        self.config, self.dataset, self.chunk = config, dataset, chunk
        self.settings = config.analysis
        self.enabled = parse_analyses(self.settings.analyses)
        self.labels = dataset.test.labels
        self.x = normalize(dataset.test.images, dataset.mean, dataset.std)
        self.saliency_index = _subset(self.settings.saliency_images, len(self.labels), config.seed)
        # A fixed handful of the saliency images whose maps are kept for every variant, side by side.
        self.showcase = _subset(SHOWCASE, len(self.saliency_index), config.seed)
        self.model, self.original = model, original
        self.logits = self.predict(model, original)
        self.maps = {}
        if "saliency" in self.enabled:
            self.maps["saliency"] = self.attention(saliency.saliency_maps, model, original)
        if "gradcam" in self.enabled:
            self.maps["gradcam"] = self.attention(gradcam.grad_cam, model, original)

    def predict(self, model, population) -> np.ndarray:
        """Test logits (P, N, C)."""
        fn = make_predict(lambda c, x: apply_compressed(model, c, x), self.dataset.mean,
                          self.dataset.std, self.config.eval_batch_size, self.chunk)
        return fn(population, self.dataset.test.images)

    def attention(self, method, model, population) -> np.ndarray:
        """Maps (P, S, H, W) of `method` (saliency or Grad-CAM) on the saliency subset."""
        index = self.saliency_index
        fn = chunked_vmap(lambda c, x, y: method(model, c, x, y), self.chunk, num_member_args=1)
        return to_host(fn(population, jnp.asarray(self.x[index]), jnp.asarray(self.labels[index])))

    def analyse(self, name: str, model, population) -> tuple[dict, dict]:
        """(results, arrays) of the variant `name` against the original population."""
        started = time.time()
        logits = self.predict(model, population)
        results, arrays = {}, {}
        labels = jnp.asarray(self.labels)
        preds_o, preds_c = self.logits.argmax(-1), logits.argmax(-1)
        num_classes = self.dataset.num_classes
        if "classes" in self.enabled:
            compared = jax.vmap(lambda a, b: classes.compare_classes(labels, a, b, num_classes))(
                jnp.asarray(preds_o), jnp.asarray(preds_c))
            macro_f1 = jax.vmap(lambda p: classes.class_report(labels, p, num_classes)["macro_f1"])
            macro_f1_o, macro_f1_c = macro_f1(jnp.asarray(preds_o)), macro_f1(jnp.asarray(preds_c))
            change = np.asarray(compared["confusion_change_pp"]).mean(0)
            class_change = np.asarray(compared["class_accuracy_change_pp"]).mean(0)
            results.update(
                disagreement=_mean(compared["disagreement"]),
                flips={k: _mean(compared[k]) for k in
                       ("flipped", "right_before", "right_after", "wrong_both")},
                max_class_acc_change_pp=_mean(compared["max_class_acc_change_pp"]),
                max_confusion_change_pp=_mean(compared["max_confusion_change_pp"]),
                macro_f1=_mean(macro_f1_c), macro_f1_diff=_mean(macro_f1_c - macro_f1_o),
                largest_confusion_changes=classes.largest_changes(
                    change, self.dataset.class_names, k=10),
                largest_class_changes=classes.largest_changes(
                    class_change, self.dataset.class_names, k=10),
                frequency_bias=classes.frequency_bias(
                    np.bincount(self.dataset.train.labels, minlength=num_classes), class_change),
            )
            arrays.update(confusion_change_pp=change, class_accuracy_change_pp=class_change)
        if "calibration" in self.enabled:
            bins = self.settings.ece_bins
            ece = jax.vmap(lambda z: calibration.expected_calibration_error(z, labels, bins))
            ece_c, ece_o = np.asarray(ece(jnp.asarray(logits))), np.asarray(ece(jnp.asarray(
                self.logits)))
            change = calibration.confidence_change(jnp.asarray(self.logits[0]),
                                                   jnp.asarray(logits[0]), labels)
            results.update(ece=float(ece_c.mean()), delta_ece=float((ece_c - ece_o).mean()),
                           confidence_diff={group: jax.tree.map(lambda a: _finite(np.asarray(a)),
                                                                change[group])
                                            for group in ("all", "same", "different")})
            reliability = calibration.calibration_bins(jnp.asarray(logits[0]), labels, bins)
            arrays.update(confidence_diff=np.asarray(change["diff"]),
                          same_prediction=np.asarray(change["same_prediction"]),
                          **{f"reliability_{k}": np.asarray(v) for k, v in reliability.items()})
        for method in ("saliency", "gradcam"):
            if method not in self.enabled:
                continue
            fn = saliency.saliency_maps if method == "saliency" else gradcam.grad_cam
            maps = self.attention(fn, model, population)
            boxes = self.dataset.test.boxes
            boxes = None if boxes is None else jnp.asarray(boxes[self.saliency_index])
            compared = jax.vmap(lambda a, b, r=boxes: saliency.compare_saliency(a, b, r))(
                jnp.asarray(self.maps[method]), jnp.asarray(maps))
            prefix = "saliency_" if method == "saliency" else "gradcam_"
            results[prefix + "mad_mean"] = _mean(compared["mad_mean"])
            results["hcc_mean" if method == "saliency" else "gradcam_hcc_mean"] = _mean(
                compared["hcc_mean"])
            if method == "saliency" and boxes is not None:
                results["roi_saliency_mass"] = _mean(compared["roi_mass_compressed"])
                results["roi_saliency_mass_original"] = _mean(compared["roi_mass_original"])
                results["roi_saliency_mass_change"] = _mean(compared["roi_saliency_mass_change"])
            mad = np.asarray(compared["mad"][0])
            top = saliency.most_changed(mad, self.settings.most_changed)
            arrays[f"{method}_mad"] = mad
            arrays[f"{method}_most_changed"] = self.saliency_index[top]
            arrays[f"{method}_maps_original"] = self.maps[method][0][top]
            arrays[f"{method}_maps"] = maps[0][top]
            arrays[f"{method}_showcase"] = maps[0][self.showcase]
        if "embeddings" in self.enabled:
            results["tsne_silhouette"], arrays["tsne"], arrays["tsne_labels"] = self.tsne(
                model, population)
        if "attacks" in self.enabled:
            results["attack"] = self.attack(model, population)
        if "hooker" in self.enabled:
            band = hooker.band_impacted_classes(labels, jnp.asarray(preds_o), jnp.asarray(preds_c),
                                                num_classes)
            results["band"] = {
                "outside_original": _mean(band["outside_original"].sum(-1)),
                "outside_compressed": _mean(band["outside_compressed"].sum(-1)),
                "crossed": _mean(band["crossed"].sum(-1)),
                "impacted_images": _mean(band["impacted_images"])}
            if preds_o.shape[0] >= 2:
                correction = None if self.settings.correction == "none" else self.settings.correction
                summary = hooker.population_summary(self.labels, preds_o, preds_c, num_classes,
                                                    alpha=self.settings.alpha, correction=correction)
                summary.pop("band", None)
                results["cie"] = summary
                cies = hooker.compression_identified_exemplars(preds_o, preds_c, num_classes,
                                                               self.labels)
                arrays["cie_per_class"] = np.asarray(cies["per_class"])
                arrays["cie_indices"] = np.asarray(cies["indices"])
        logging.info("analysed %s in %.0f s", name, time.time() - started)
        return results, arrays

    def tsne(self, model, population) -> tuple[float, np.ndarray, np.ndarray]:
        """Silhouette of the t-SNE embedding of member 0's penultimate features, the embedding and
        its labels, on the `tsne_classes` classes with the most test images."""
        counts = np.bincount(self.labels, minlength=self.dataset.num_classes)
        chosen = np.sort(np.argsort(-counts, kind="stable")[:self.settings.tsne_classes])
        index = embeddings.select_classes(self.labels, chosen, self.settings.tsne_per_class,
                                          self.config.seed)
        features = embeddings.penultimate_features(model, take_members(population, 0),
                                                   jnp.asarray(self.x[index]))
        embedded = embeddings.tsne_embedding(np.asarray(features), seed=self.config.seed)
        return (float(embeddings.cluster_separation(embedded, self.labels[index])), embedded,
                self.labels[index])

    def attack(self, model, population) -> dict:
        """Carlini-Wagner L2 on member 0 over `attack_images` test images, and its time per image."""
        s = self.settings
        index = _subset(s.attack_images, len(self.labels), self.config.seed + 1)
        member = take_members(population, slice(0, 1))
        attack = attacks.make_population_attack(
            model, self.dataset.mean, self.dataset.std, chunk=1, confidence=s.attack_confidence,
            binary_search_steps=s.attack_search_steps, max_iterations=s.attack_iterations)
        images01 = jnp.asarray(self.dataset.test.images[index], jnp.float32) / 255.0
        labels = jnp.asarray(self.labels[index])
        jax.block_until_ready(attack(member, images01, labels))  # compiles
        started = time.perf_counter()
        result = take_members(jax.block_until_ready(attack(member, images01, labels)), 0)
        seconds = (time.perf_counter() - started) / len(index)
        summary = attacks.attack_summary(
            attacks.pixel_space_apply(model, take_members(member, 0), self.dataset.mean,
                                      self.dataset.std), images01, labels, result)
        return {**{k: _finite(np.asarray(v)) for k, v in summary.items()},
                "seconds_per_image": seconds}


def analyse_population(config: ml_collections.ConfigDict, dataset: Dataset, model, original,
                       models: dict, populations: dict, chunk: int) -> tuple[dict, dict]:
    """(summary for results.json, arrays for the figures) of every variant in `populations`."""
    analysis = PopulationAnalysis(config, dataset, model, original, chunk)
    variants, arrays = {}, {}
    baseline = {}
    if "calibration" in analysis.enabled:
        bins = config.analysis.ece_bins
        labels = jnp.asarray(analysis.labels)
        ece = jax.vmap(lambda z: calibration.expected_calibration_error(z, labels, bins))(
            jnp.asarray(analysis.logits))
        baseline["ece"] = float(np.mean(ece))
        reliability = calibration.calibration_bins(jnp.asarray(analysis.logits[0]), labels, bins)
        arrays.update({f"baseline.reliability_{k}": np.asarray(v) for k, v in reliability.items()})
    if "embeddings" in analysis.enabled:
        baseline["tsne_silhouette"], arrays["baseline.tsne"], arrays["baseline.tsne_labels"] = (
            analysis.tsne(model, original))
    if "attacks" in analysis.enabled:
        baseline["attack"] = analysis.attack(model, original)
    variants["baseline"] = baseline
    for name, population in populations.items():
        results, variant_arrays = analysis.analyse(name, models[name], population)
        variants[name] = results
        arrays.update({f"{name}.{k}": v for k, v in variant_arrays.items()})
    for method, maps in analysis.maps.items():
        arrays[f"baseline.{method}_showcase"] = maps[0][analysis.showcase]
    arrays["showcase_index"] = analysis.saliency_index[analysis.showcase]
    return {"variants": variants}, arrays
