"""Robustness (Zee et al.): the Carlini-Wagner L2 attack on every member, before and after compression.

On `images` test images (fixed by the seed), every member of the original and of each variant is
attacked (untargeted C&W L2, Carlini & Wagner 2017, `iterations` per search step, `search_steps`
binary search steps of the constant c, margin `confidence`; through the straight-through
estimator for quantized variants; `compax.measure.attacks`) with early stopping at the time to
fool. Reported per variant as mean ± std over members: accuracy and true-class confidence before
and after, success rate, median L2 of the successful perturbations, and seconds per image.
"""

import numpy as np

from compax.analyses.base import (
    Analysis,
    finite,
    fmt,
    fmt_mean_std,
    integer_setting,
    register_analysis,
    subset,
)
from compax.errors import UserError

KEYS = ("accuracy_before", "accuracy_after", "confidence_before", "confidence_after",
        "success_rate", "mean_l2", "median_l2")


@register_analysis
class Attacks(Analysis):
    name = "attacks"
    title = "Robustness (Carlini-Wagner L2)"
    settings = {"images": 64, "iterations": 100, "search_steps": 5, "confidence": 0.0}

    @classmethod
    def check(cls, settings):
        for key in ("images", "iterations", "search_steps"):
            integer_setting(settings, cls.name, key, 1)
        if not settings.confidence >= 0:
            raise UserError("--config.analysis.attacks.confidence must be >= 0, got"
                            f" {settings.confidence}")

    def attack(self, ref, model, population) -> dict:
        import jax.numpy as jnp

        from compax.measure import attacks

        s = self.settings
        index = subset(s.images, len(ref.labels), ref.config.seed + 1)
        images01 = jnp.asarray(ref.dataset.test.images[index], jnp.float32) / 255.0
        result = attacks.attack_population(
            model, population, ref.dataset.mean, ref.dataset.std, images01,
            jnp.asarray(ref.labels[index]), chunk=ref.chunk, confidence=s.confidence,
            binary_search_steps=s.search_steps, max_iterations=s.iterations)
        member0 = result["members"][0]
        return {
            **{k: finite(np.float64(member0[k])) for k in KEYS},  # member 0, the example
            "members": {k: {"mean": finite(np.float64(result["mean"][k])),
                            "std": finite(np.float64(result["std"][k]))} for k in KEYS},
            "seconds_per_image": result["seconds_per_image"],
            "samples": int(len(index)),
        }

    def baseline(self, ref):
        return self.attack(ref, ref.model, ref.original), {}

    def compare(self, ref, variant):
        return self.attack(ref, variant.model, variant.population), {}

    def columns(self, results):
        members = results.get("members", {})
        return {"CW success": fmt_mean_std(members.get("success_rate"), 2),
                "CW median L2": fmt_mean_std(members.get("median_l2"), 3)}

    def report(self, page, results, arrays):
        rows = [[variant] + [fmt_mean_std(a["members"][k], 3) for k in KEYS]
                + [fmt(a.get("seconds_per_image"), 4)] for variant, a in results.items()]
        page.table(self.title, ["variant"] + [k.replace("_", " ") for k in KEYS]
                   + ["s per image (time to fool)"], rows,
                   "Before and after the attack, mean ± std over members")
