"""Embeddings (Zee et al.): t-SNE of the penultimate features and how well classes separate.

For every member, the penultimate features of `tsne_per_class` test images of each of the
`tsne_classes` classes with the most test images are embedded with t-SNE (scikit-learn, seeded);
the silhouette score of the embedding by class measures separation (`compax.measure.embeddings`).
Reported as mean ± std over members; member 0's embedding is drawn.
"""

import jax.numpy as jnp
import numpy as np

from compax.analyses import Analysis, Compared, Reference, fmt, mean_std, register_analysis
from compax.errors import UserError
from compax.measure import embeddings
from compax.member_vmap import take_members


@register_analysis
class Embeddings(Analysis):
    name = "embeddings"
    title = "Embeddings (t-SNE)"
    settings = {"tsne_classes": 10, "tsne_per_class": 60}

    @classmethod
    def check(cls, settings):
        for key in cls.settings:
            if not isinstance(settings[key], int) or settings[key] < 2:
                raise UserError(f"--config.analysis.{key} must be an integer >= 2, got"
                                f" {settings[key]!r}")

    def embed(self, ref: Reference, model, population):
        """Silhouettes of every member, member 0's embedding and its labels."""
        counts = np.bincount(ref.labels, minlength=ref.num_classes)
        chosen = np.sort(np.argsort(-counts, kind="stable")[:ref.settings.tsne_classes])
        index = embeddings.select_classes(ref.labels, chosen, ref.settings.tsne_per_class,
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
        return {"tsne_silhouette": stats["mean"], "tsne_silhouette_std": stats["std"],
                "tsne_silhouette_members": scores}

    def baseline(self, ref):
        scores, embedded, labels = self.embed(ref, ref.model, ref.original)
        return self._results(scores), {"tsne": embedded, "tsne_labels": labels}

    def compare(self, ref: Reference, variant: Compared):
        scores, embedded, labels = self.embed(ref, variant.model, variant.population)
        return self._results(scores), {"tsne": embedded, "tsne_labels": labels}

    def columns(self, results):
        return {"t-SNE silhouette": fmt(results.get("tsne_silhouette"), 3)}

    def report(self, page, results, arrays):
        from compax.report import figures

        page.figure(self.title, figures.tsne(page.directory, results, arrays, page.class_names),
                    "t-SNE (member 0)")
        page.figure(self.title, figures.population_spread(
            page.directory, results, "tsne_silhouette_members", "t-SNE silhouette",
            "tsne_silhouette_members.png"), "silhouette per member")
