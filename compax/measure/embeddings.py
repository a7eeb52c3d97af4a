"""Penultimate-layer embeddings of any compressed variant, their t-SNE maps and cluster separation.

Zee, Lakshmana & Nwogu compare t-SNE maps (van der Maaten & Hinton 2008, "Visualizing Data using
t-SNE", JMLR) of the embeddings of a model before and after compression on a few classes. The
embedding is the classifier's input (`compax.measure.taps`); how well classes separate in it is
measured by the silhouette score (Rousseeuw 1987, "Silhouettes: a graphical aid to the
interpretation and validation of cluster analysis").

`penultimate_features` is jnp (jit- and vmap-compatible over `compressed`); the t-SNE, silhouette
and class selection run in NumPy / scikit-learn on one model's results.
"""

import jax.numpy as jnp
import numpy as np
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

from compax.compress import Compressed
from compax.errors import UserError
from compax.measure.taps import apply_with_taps, map_batches


def penultimate_features(model, compressed: Compressed, x, batch_size: int = 256):
    """The classifier's input f(x_i) of the variant for normalised images `x` (N, H, W, C), (N, D)
    float32 (averaged over space for SqueezeNet's convolutional classifier). Runs `batch_size`
    images at a time (`lax.map`); jit- and vmap-compatible over `compressed`."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4:
        raise UserError(f"images of shape {x.shape}: pass normalised images (N, H, W, C)")
    return map_batches(lambda images: apply_with_taps(model, compressed, images)[1]["features"],
                       batch_size, x)


def tsne_embedding(features, seed: int, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE map (N, 2) of `features` (N, D) (van der Maaten & Hinton 2008).

    scikit-learn's Barnes-Hut t-SNE: minimises KL(P || Q) between Gaussian neighbour probabilities
    P (bandwidths set by `perplexity`) and Student-t probabilities Q of the map, starting from the
    PCA projection; the same `seed` gives the same map.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or not 0 < perplexity < features.shape[0]:
        raise UserError(f"t-SNE of features {features.shape} with perplexity {perplexity}: pass (N, D) "
                        "features with more samples than the perplexity (lower the perplexity)")
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(features).astype(np.float32)


def cluster_separation(features_or_embedding, labels) -> float:
    """Mean silhouette s = mean_i (b_i - a_i) / max(a_i, b_i) (Rousseeuw 1987), with a_i the mean
    Euclidean distance of sample i to its own class and b_i to the nearest other class; in [-1, 1],
    near 1 for compact, well separated classes."""
    points = np.asarray(features_or_embedding, np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels).size
    if points.ndim != 2 or labels.shape != points.shape[:1] or not 2 <= classes < points.shape[0]:
        raise UserError(f"silhouette of points {points.shape} with labels {labels.shape} of {classes} "
                        "classes: pass (N, D) points and (N,) labels of 2 to N - 1 classes")
    return float(silhouette_score(points, labels))


def select_classes(labels, classes, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` samples of each class in `classes`, drawn without replacement with
    NumPy's generator seeded by `seed`; grouped by class in the order of `classes`, ascending
    within a class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if members.size < per_class:
            raise UserError(f"class {c} has {members.size} samples, fewer than per_class={per_class}: "
                            "lower per_class or choose other classes")
        chosen.append(np.sort(rng.choice(members, per_class, replace=False)))
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
