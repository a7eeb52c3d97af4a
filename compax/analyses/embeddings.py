"""Embeddings (Zee et al.): t-SNE of the penultimate features and how well classes separate.

For every member, the penultimate features of `per_class` test images of each of the `classes`
classes with the most test images are embedded with t-SNE (scikit-learn, seeded); the silhouette
score of the embedding by class measures separation (`compax.measure.embeddings`). Reported as
mean ± std over members; member 0's embedding is drawn. The features are read at the classifier's
input by `compax.measure.taps`, which needs a convolutional module before the classifier.
"""

import numpy as np

from compax import plots
from compax.analyses.base import Analysis, fmt, integer_setting, mean_std, register_analysis
from compax.errors import UserError

# The t-SNE perplexity (compax/measure/embeddings.py): the sample count must exceed it.
TSNE_PERPLEXITY = 30


@register_analysis
class Embeddings(Analysis):
    name = "embeddings"
    title = "Embeddings (t-SNE)"
    settings = {"classes": 10, "per_class": 60}

    @classmethod
    def check(cls, settings):
        for key in cls.settings:
            integer_setting(settings, cls.name, key, 2)
        if settings.classes * settings.per_class <= TSNE_PERPLEXITY:
            raise UserError(f"--config.analysis.embeddings.per_class={settings.per_class} must be"
                            f" > {TSNE_PERPLEXITY // settings.classes} with"
                            f" --config.analysis.embeddings.classes={settings.classes}: t-SNE needs"
                            f" more than {TSNE_PERPLEXITY} samples (its perplexity)")

    @classmethod
    def applies(cls, model, data):
        from compax.analyses.reference import why_no_taps

        return why_no_taps(model, data.image_shape)

    def embed(self, ref, model, population):
        """Silhouettes of every member, member 0's embedding and its labels."""
        import jax.numpy as jnp

        from compax.measure import embeddings
        from compax.member_vmap import take_members

        counts = np.bincount(ref.labels, minlength=ref.num_classes)
        chosen = np.sort(np.argsort(-counts, kind="stable")[:self.settings.classes])
        index = embeddings.select_classes(ref.labels, chosen, self.settings.per_class,
                                          ref.config.seed)
        scores, first = [], None
        for member in range(ref.members):
            features = embeddings.penultimate_features(model, take_members(population, member),
                                                       jnp.asarray(ref.x[index]))
            embedded = embeddings.tsne_embedding(np.asarray(features), seed=ref.config.seed)
            scores.append(float(embeddings.cluster_separation(embedded, ref.labels[index])))
            first = embedded if first is None else first
        return scores, first, ref.labels[index]

    def _results(self, scores):
        stats = mean_std(scores)
        return {"silhouette": stats["mean"], "silhouette_std": stats["std"],
                "silhouette_members": scores}

    def baseline(self, ref):
        scores, embedded, labels = self.embed(ref, ref.model, ref.original)
        return self._results(scores), {"tsne": embedded, "tsne_labels": labels}

    def compare(self, ref, variant):
        scores, embedded, labels = self.embed(ref, variant.model, variant.population)
        return self._results(scores), {"tsne": embedded, "tsne_labels": labels}

    def columns(self, results):
        return {"t-SNE silhouette": fmt(results.get("silhouette"), 3)}

    def report(self, page, results, arrays):
        page.figure(self.title, tsne(page.directory, results, arrays, page.class_names),
                    "t-SNE (member 0)")
        page.figure(self.title, plots.population_spread(
            page.directory, {v: r.get("silhouette_members") for v, r in results.items()},
            "t-SNE silhouette", "tsne_silhouette_members.png"), "silhouette per member")


def tsne(directory, results, arrays, class_names) -> str | None:
    """t-SNE of penultimate embeddings per variant, with the silhouette score (Zee et al.)."""
    names = [v for v in results if f"{v}.tsne" in arrays]
    if not names:
        return None
    fig, axes = plots.subplots(1, len(names), figsize=(3 * len(names), 3), squeeze=False)
    for ax, v in zip(axes[0], names, strict=True):
        xy, labels = arrays[f"{v}.tsne"], arrays[f"{v}.tsne_labels"]
        for j, c in enumerate(np.unique(labels)):
            keep = labels == c
            ax.scatter(xy[keep, 0], xy[keep, 1], s=3, color=plots.class_colour(j),
                       label=class_names[c])
        score = results[v].get("silhouette")
        ax.set(title=f"{v}" + (f"\nsilhouette {score:.3f}" if score is not None else ""),
               xticks=[], yticks=[])
    axes[0][-1].legend(fontsize=5, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    return plots.save(fig, directory, "tsne.png")
