"""Attention maps compared between each member and its compressed version: saliency and Grad-CAM.

Saliency (Simonyan et al. 2014; Schwaiger et al. 2022): the gradient of the target logit with
respect to the input, max over channels, normalised to [0, 1]; also for quantized variants, through
the straight-through estimator. Grad-CAM (Selvaraju et al. 2017) on the last convolutional stage.
Maps are compared per sample by the mean absolute deviation after 3x3 average pooling with stride
3 (MAD, Schwaiger et al.), the heatmap correlation coefficient (HCC, Mantowsky et al.) and, where
the data have object boxes (GTSRB), the share of saliency inside the sign's box. Computed for every
member on `saliency_images` test images (0: all); the 20 most changed maps of member 0 and a fixed
showcase are kept for the figures.
"""

import jax
import jax.numpy as jnp
import numpy as np

from compax.analyses import Analysis, Compared, Reference, fmt, member_mean, register_analysis, subset
from compax.errors import UserError
from compax.measure import gradcam, saliency
from compax.member_vmap import chunked_vmap

SHOWCASE = 8


class AttentionAnalysis(Analysis):
    """Maps of `method(model, compressed, x, targets)` compared with the original's (module doc)."""

    prefix = ""
    hcc_key = ""

    @staticmethod
    def method(model, compressed, x, targets):
        raise NotImplementedError

    @classmethod
    def check(cls, settings):
        for key in ("saliency_images", "most_changed"):
            if not isinstance(settings[key], int) or settings[key] < 0:
                raise UserError(f"--config.analysis.{key} must be an integer >= 0, got"
                                f" {settings[key]!r}")

    def maps(self, ref: Reference, model, population) -> np.ndarray:
        fn = chunked_vmap(lambda c, x, y: self.method(model, c, x, y), ref.chunk, num_member_args=1)
        return np.asarray(jax.device_get(fn(population, jnp.asarray(ref.x[self.index]),
                                            jnp.asarray(ref.labels[self.index]))))

    def prepare(self, ref: Reference) -> None:
        self.index = subset(ref.settings.saliency_images, len(ref.labels), ref.config.seed)
        self.showcase = subset(SHOWCASE, len(self.index), ref.config.seed)
        self.original = self.maps(ref, ref.model, ref.original)

    def baseline(self, ref):
        return {}, {f"{self.name}_showcase": self.original[0][self.showcase],
                    f"{self.name}_showcase_index": self.index[self.showcase]}

    def compare(self, ref: Reference, variant: Compared):
        maps = self.maps(ref, variant.model, variant.population)
        boxes = ref.dataset.test.boxes
        boxes = None if boxes is None else jnp.asarray(boxes[self.index])
        compared = jax.vmap(lambda a, b: saliency.compare_saliency(a, b, boxes))(
            jnp.asarray(self.original), jnp.asarray(maps))
        results = {f"{self.prefix}mad_mean": member_mean(compared["mad_mean"]),
                   self.hcc_key: member_mean(compared["hcc_mean"])}
        if boxes is not None and self.name == "saliency":
            results["roi_saliency_mass"] = member_mean(compared["roi_mass_compressed"])
            results["roi_saliency_mass_original"] = member_mean(compared["roi_mass_original"])
            results["roi_saliency_mass_change"] = member_mean(compared["roi_saliency_mass_change"])
        mad = np.asarray(compared["mad"][0])
        top = saliency.most_changed(mad, ref.settings.most_changed)
        arrays = {f"{self.name}_mad": mad, f"{self.name}_most_changed": self.index[top],
                  f"{self.name}_maps_original": self.original[0][top],
                  f"{self.name}_maps": maps[0][top],
                  f"{self.name}_showcase": maps[0][self.showcase]}
        return results, arrays

    def columns(self, results):
        return {f"{self.title} MAD": fmt(results.get(f"{self.prefix}mad_mean"), 3),
                f"{self.title} HCC": fmt(results.get(self.hcc_key), 3)}

    def report(self, page, results, arrays):
        from compax.report import figures

        page.figure(self.title, figures.mad_distribution(page.directory, results, arrays, self.name),
                    f"{self.name} MAD")
        page.figure(self.title, figures.attention_side_by_side(page.directory, results, arrays,
                                                               page.images, self.name),
                    f"{self.name} side by side")
        for variant, _ in page.compressed(results):
            page.figure(self.title, figures.attention_grid(page.directory, arrays, variant,
                                                           page.images, self.name),
                        f"{self.name} {variant}")


@register_analysis
class Saliency(AttentionAnalysis):
    name = "saliency"
    title = "Saliency"
    prefix = "saliency_"
    hcc_key = "hcc_mean"
    settings = {"saliency_images": 0, "most_changed": 20}
    method = staticmethod(saliency.saliency_maps)

    def columns(self, results):
        return {"saliency MAD": fmt(results.get("saliency_mad_mean"), 3),
                "HCC": fmt(results.get("hcc_mean"), 3),
                "ROI mass Δ": fmt(results.get("roi_saliency_mass_change"), 3, True)}

    def report(self, page, results, arrays):
        super().report(page, results, arrays)
        rows = [[variant, fmt(v.get("saliency_mad_mean"), 4), fmt(v.get("hcc_mean"), 3),
                 fmt(v.get("roi_saliency_mass_original"), 3), fmt(v.get("roi_saliency_mass"), 3),
                 fmt(v.get("roi_saliency_mass_change"), 3, True)]
                for variant, v in page.compressed(results)]
        page.table(self.title, ["variant", "MAD (3×3 pooled)", "HCC", "ROI mass original",
                                "ROI mass compressed", "ROI mass Δ"], rows,
                   "Saliency against the original (member means)")


@register_analysis
class GradCam(AttentionAnalysis):
    name = "gradcam"
    title = "Grad-CAM"
    prefix = "gradcam_"
    hcc_key = "gradcam_hcc_mean"
    method = staticmethod(gradcam.grad_cam)
