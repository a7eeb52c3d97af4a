"""What the analyses compute from: the original population's test outputs (`Reference`) and one
compressed population's (`Compared`), with the test logits of a population and member means.
Imported by the analyses' computing methods, never at their import (it imports jax)."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from compax.compress import apply_compressed
from compax.data import Dataset, normalize
from compax.member_vmap import make_predict


def member_mean(tree):
    """Mean over the member axis of every array in `tree`, as plain floats / lists (NaN ignored)."""
    return jax.tree.map(lambda a: np.asarray(jnp.nanmean(jnp.asarray(a, jnp.float32), 0)).tolist(),
                        tree)


def population_logits(model, population, dataset: Dataset, batch_size: int, chunk: int) -> np.ndarray:
    """Test logits (P, N, C) of `population`, a `Compressed` with a leading member axis evaluated
    by the flax module `model`, `batch_size` images and `chunk` members at a time."""
    fn = make_predict(lambda c, x: apply_compressed(model, c, x), dataset.mean, dataset.std,
                      batch_size, chunk)
    return fn(population, dataset.test.images)


class Reference:
    """The test set and the original population's outputs, shared by every analysis of a run."""

    def __init__(self, config: ml_collections.ConfigDict, dataset: Dataset, model, original,
                 chunk: int):
        self.config, self.dataset, self.chunk = config, dataset, chunk
        self.model, self.original = model, original
        self.labels = dataset.test.labels
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names
        self.x = normalize(dataset.test.images, dataset.mean, dataset.std)
        self.logits = self.predict(model, original)
        self.preds = self.logits.argmax(-1)

    @property
    def members(self) -> int:
        return self.logits.shape[0]

    def predict(self, model, population) -> np.ndarray:
        """Test logits (P, N, C) of a population of `Compressed`."""
        return population_logits(model, population, self.dataset, self.config.eval_batch_size,
                                 self.chunk)


@dataclasses.dataclass
class Compared:
    """One compressed population under analysis, with its test logits (P, N, C). `design`:
    "paired" when member m was compressed from original member m, "independent" when the
    population was trained on its own (`Variant.info["design"]`)."""

    name: str
    model: Any
    population: Any
    logits: np.ndarray
    design: str = "paired"

    @property
    def preds(self) -> np.ndarray:
        return self.logits.argmax(-1)


def why_no_taps(model, image_shape: tuple[int, ...]) -> str | None:
    """None when `compax.measure.taps` can tap `model` on images of `image_shape` (a convolutional
    module before a classifier, each called once: Grad-CAM and the embeddings read them), else
    why not. Traces the model abstractly (no computation)."""
    from compax.compress import Compressed
    from compax.errors import UserError
    from compax.measure.taps import tap_points

    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    try:
        tap_points(model, Compressed(variables, None), images)
    except UserError as e:
        return str(e).partition(":")[0]
    return None
