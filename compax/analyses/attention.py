"""Attention maps compared between each member and its compressed version: saliency and Grad-CAM.

Saliency (Simonyan et al. 2014; Schwaiger et al. 2022): the gradient of the target logit with
respect to the input, max over channels, normalised to [0, 1]; also for quantized variants, through
the straight-through estimator. Grad-CAM (Selvaraju et al. 2017) on the last convolutional stage
(it applies to models with one). Maps are compared per sample by the mean absolute deviation
after 3x3 average pooling with stride 3 (MAD, Schwaiger et al.), the heatmap correlation
coefficient (HCC, Mantowsky et al.) and, where the data have object boxes (GTSRB), the share of
saliency inside the sign's box. Computed for every member on `images` test images (0: all); the
`most_changed` maps of member 0 and a fixed showcase are kept for the figures.
"""

import numpy as np

from compax import plots
from compax.analyses.base import Analysis, fmt, integer_setting, register_analysis, subset

SHOWCASE = 8


class AttentionAnalysis(Analysis):
    """Maps of `method(model, compressed, x, targets)` compared with the original's (module doc)."""

    settings = {"images": 0, "most_changed": 20}

    @staticmethod
    def method(model, compressed, x, targets):
        raise NotImplementedError

    @classmethod
    def check(cls, settings):
        for key in cls.settings:
            integer_setting(settings, cls.name, key, 0)

    def maps(self, ref, model, population) -> np.ndarray:
        import jax
        import jax.numpy as jnp

        from compax.member_vmap import chunked_vmap

        fn = chunked_vmap(lambda c, x, y: self.method(model, c, x, y), ref.chunk, num_member_args=1)
        return np.asarray(jax.device_get(fn(population, jnp.asarray(ref.x[self.index]),
                                            jnp.asarray(ref.labels[self.index]))))

    def prepare(self, ref) -> None:
        self.index = subset(self.settings.images, len(ref.labels), ref.config.seed)
        self.showcase = subset(SHOWCASE, len(self.index), ref.config.seed)
        self.original = self.maps(ref, ref.model, ref.original)

    def baseline(self, ref):
        return {}, {"showcase": self.original[0][self.showcase],
                    "showcase_index": self.index[self.showcase]}

    def compare(self, ref, variant):
        import jax
        import jax.numpy as jnp

        from compax.analyses.reference import member_mean
        from compax.measure import saliency

        maps = self.maps(ref, variant.model, variant.population)
        boxes = ref.dataset.test.boxes
        boxes = None if boxes is None else jnp.asarray(boxes[self.index])
        compared = jax.vmap(lambda a, b: saliency.compare_saliency(a, b, boxes))(
            jnp.asarray(self.original), jnp.asarray(maps))
        results = {"mad_mean": member_mean(compared["mad_mean"]),
                   "hcc_mean": member_mean(compared["hcc_mean"])}
        if boxes is not None and self.name == "saliency":
            results["roi_mass"] = member_mean(compared["roi_mass_compressed"])
            results["roi_mass_original"] = member_mean(compared["roi_mass_original"])
            results["roi_mass_change"] = member_mean(compared["roi_saliency_mass_change"])
        mad = np.asarray(compared["mad"][0])
        top = saliency.most_changed(mad, self.settings.most_changed)
        arrays = {"mad": mad, "most_changed": self.index[top],
                  "maps_original": self.original[0][top], "maps": maps[0][top],
                  "showcase": maps[0][self.showcase]}
        return results, arrays

    def columns(self, results):
        return {f"{self.title} MAD": fmt(results.get("mad_mean"), 3),
                f"{self.title} HCC": fmt(results.get("hcc_mean"), 3)}

    def report(self, page, results, arrays):
        page.figure(self.title, mad_distribution(page.directory, arrays, self.name, self.title),
                    f"{self.name} MAD")
        page.figure(self.title, side_by_side(page.directory, results, arrays, page.images,
                                             self.name), f"{self.name} side by side")
        for variant, _ in page.compressed(results):
            page.figure(self.title, most_changed_grid(page.directory, arrays, variant, page.images,
                                                      self.name), f"{self.name} {variant}")


@register_analysis
class Saliency(AttentionAnalysis):
    name = "saliency"
    title = "Saliency"

    @staticmethod
    def method(model, compressed, x, targets):
        from compax.measure.saliency import saliency_maps

        return saliency_maps(model, compressed, x, targets)

    def columns(self, results):
        return {"saliency MAD": fmt(results.get("mad_mean"), 3),
                "HCC": fmt(results.get("hcc_mean"), 3),
                "ROI mass Δ": fmt(results.get("roi_mass_change"), 3, True)}

    def report(self, page, results, arrays):
        super().report(page, results, arrays)
        rows = [[variant, fmt(v.get("mad_mean"), 4), fmt(v.get("hcc_mean"), 3),
                 fmt(v.get("roi_mass_original"), 3), fmt(v.get("roi_mass"), 3),
                 fmt(v.get("roi_mass_change"), 3, True)]
                for variant, v in page.compressed(results)]
        page.table(self.title, ["variant", "MAD (3×3 pooled)", "HCC", "ROI mass original",
                                "ROI mass compressed", "ROI mass Δ"], rows,
                   "Saliency against the original (member means)")


@register_analysis
class GradCam(AttentionAnalysis):
    name = "gradcam"
    title = "Grad-CAM"

    @staticmethod
    def method(model, compressed, x, targets):
        from compax.measure.gradcam import grad_cam

        return grad_cam(model, compressed, x, targets)

    @classmethod
    def applies(cls, model, data):
        from compax.analyses.reference import why_no_taps

        return why_no_taps(model, data.image_shape)


def mad_distribution(directory, arrays, method: str, title: str) -> str | None:
    """Distribution of the per-sample MAD of the 3x3-pooled maps (Schwaiger Fig. 5)."""
    variants = plots.variants_with(arrays, "mad")
    if not variants:
        return None
    fig, ax = plots.subplots(figsize=(6, 3.5))
    top = max(float(arrays[f"{v}.mad"].max()) for v in variants)
    bins = np.linspace(0, max(top, 1e-3), 50)
    for v in variants:
        ax.hist(arrays[f"{v}.mad"], bins, histtype="step", lw=1.2, label=v)
    ax.set(xlabel="MAD of 3x3-pooled maps", ylabel="test samples", yscale="log",
           title=f"{title} change per sample")
    ax.legend(fontsize=7)
    return plots.save(fig, directory, f"{method}_mad.png")


def most_changed_grid(directory, arrays, variant, images, method: str, columns=10) -> str | None:
    """The most changed samples: image, original map, compressed map (Schwaiger Fig. 4)."""
    key = f"{variant}.most_changed"
    if key not in arrays:
        return None
    index = arrays[key]
    original, compressed = arrays[f"{variant}.maps_original"], arrays[f"{variant}.maps"]
    mad = arrays[f"{variant}.mad"]
    order = np.argsort(-mad, kind="stable")[:len(index)]
    n = len(index)
    if n == 0:
        return None
    columns = min(columns, n)
    blocks = -(-n // columns)
    fig, axes = plots.subplots(3 * blocks, columns, figsize=(1.3 * columns, 1.35 * 3 * blocks),
                               squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(n):
        row, col = 3 * (k // columns), k % columns
        axes[row][col].imshow(images[index[k]])
        axes[row][col].set_title(f"MAD {mad[order[k]]:.3f}", fontsize=6)
        axes[row + 1][col].imshow(original[k], cmap="inferno", vmin=0, vmax=1)
        axes[row + 2][col].imshow(compressed[k], cmap="inferno", vmin=0, vmax=1)
    axes[1][0].text(-0.1, 0.5, "original", transform=axes[1][0].transAxes, rotation=90,
                    ha="right", va="center", fontsize=7)
    axes[2][0].text(-0.1, 0.5, variant, transform=axes[2][0].transAxes, rotation=90,
                    ha="right", va="center", fontsize=7)
    fig.suptitle(f"{method}: the {n} most changed test samples ({variant})", fontsize=9)
    return plots.save(fig, directory, f"{method}_most_changed_{variant}.png")


def side_by_side(directory, results, arrays, images, method: str) -> str | None:
    """The same test samples under the original and every variant (original / pruned / quantized)."""
    names = [v for v in results if f"{v}.showcase" in arrays]
    if len(names) < 2:
        return None
    index = arrays["baseline.showcase_index"]
    fig, axes = plots.subplots(len(index), len(names) + 1,
                               figsize=(1.25 * (len(names) + 1), 1.3 * len(index)), squeeze=False)
    for r, i in enumerate(index):
        axes[r][0].imshow(images[i])
        for c, name in enumerate(names, start=1):
            axes[r][c].imshow(arrays[f"{name}.showcase"][r], cmap="inferno", vmin=0, vmax=1)
            if r == 0:
                axes[r][c].set_title("original" if name == "baseline" else name, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    return plots.save(fig, directory, f"{method}_side_by_side.png")
