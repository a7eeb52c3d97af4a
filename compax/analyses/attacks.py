"""Robustness (Zee et al.): the Carlini-Wagner L2 attack on every member, before and after compression.

On `attack_images` test images (fixed by the seed), every member of the original and of each
variant is attacked (untargeted C&W L2, Carlini & Wagner 2017, through the straight-through
estimator for quantized variants; `compax.measure.attacks`) with early stopping at the time to
fool. Reported per variant as mean ± std over members: accuracy and true-class confidence before
and after, success rate, median L2 of the successful perturbations, and seconds per image.
"""

import jax.numpy as jnp
import numpy as np

from compax.analyses import (
    Analysis,
    Compared,
    Reference,
    finite,
    fmt,
    fmt_mean_std,
    register_analysis,
    subset,
)
from compax.errors import UserError
from compax.measure import attacks

KEYS = ("accuracy_before", "accuracy_after", "confidence_before", "confidence_after",
        "success_rate", "mean_l2", "median_l2")


@register_analysis
class Attacks(Analysis):
    name = "attacks"
    title = "Robustness (Carlini-Wagner L2)"
    settings = {"attack_images": 64, "attack_iterations": 100, "attack_search_steps": 5,
                "attack_confidence": 0.0}

    @classmethod
    def check(cls, settings):
        for key in ("attack_images", "attack_iterations", "attack_search_steps"):
            if not isinstance(settings[key], int) or settings[key] < 1:
                raise UserError(f"--config.analysis.{key} must be an integer >= 1, got"
                                f" {settings[key]!r}")
        if not settings.attack_confidence >= 0:
            raise UserError("--config.analysis.attack_confidence must be >= 0, got"
                            f" {settings.attack_confidence}")

    def attack(self, ref: Reference, model, population) -> dict:
        s = ref.settings
        index = subset(s.attack_images, len(ref.labels), ref.config.seed + 1)
        images01 = jnp.asarray(ref.dataset.test.images[index], jnp.float32) / 255.0
        result = attacks.attack_population(
            model, population, ref.dataset.mean, ref.dataset.std, images01,
            jnp.asarray(ref.labels[index]), chunk=ref.chunk, confidence=s.attack_confidence,
            binary_search_steps=s.attack_search_steps, max_iterations=s.attack_iterations)
        member0 = result["members"][0]
        return {
            **{k: finite(np.float64(member0[k])) for k in KEYS},  # member 0, the example
            "members": {k: {"mean": finite(np.float64(result["mean"][k])),
                            "std": finite(np.float64(result["std"][k]))} for k in KEYS},
            "seconds_per_image": result["seconds_per_image"],
            "samples": int(len(index)),
        }

    def baseline(self, ref):
        return {"attack": self.attack(ref, ref.model, ref.original)}, {}

    def compare(self, ref: Reference, variant: Compared):
        return {"attack": self.attack(ref, variant.model, variant.population)}, {}

    def columns(self, results):
        members = (results.get("attack") or {}).get("members", {})
        return {"CW success": fmt_mean_std(members.get("success_rate"), 2),
                "CW median L2": fmt_mean_std(members.get("median_l2"), 3)}

    def report(self, page, results, arrays):
        rows = []
        for variant, v in results["variants"].items():
            a = v.get("attack")
            if not a:
                continue
            m = a["members"]
            rows.append([variant] + [fmt_mean_std(m[k], 3) for k in KEYS]
                        + [fmt(a.get("seconds_per_image"), 4)])
        page.table(self.title, ["variant"] + [k.replace("_", " ") for k in KEYS]
                   + ["s per image (time to fool)"], rows,
                   "Before and after the attack, mean ± std over members")
