"""A tiny learnable dataset for fast training tests: each class is a coloured square at a place."""

import ml_collections
import numpy as np

from compax.config import base_config
from compax.data.dataset import Dataset, Split, channel_stats


def tiny_dataset(num_classes: int = 4, per_class: int = 48, seed: int = 0) -> Dataset:
    """Noisy 32x32 images; class c has a square of colour c at position c, its box the object box
    (train/val/test 4:1:1)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(60, 255, (num_classes, 3))

    def split(n_per_class):
        labels = np.repeat(np.arange(num_classes, dtype=np.int32), n_per_class)
        images = rng.integers(0, 90, (len(labels), 32, 32, 3)).astype(np.uint8)
        boxes = np.zeros((len(labels), 4), np.float32)
        for i, c in enumerate(labels):
            y, x = 4 + 6 * (c % 4) + rng.integers(-2, 3), 4 + 6 * (c // 4) + rng.integers(-2, 3)
            images[i, y:y + 8, x:x + 8] = colours[c]
            boxes[i] = x, y, x + 8, y + 8
        return Split(images, labels, boxes)

    train = split(per_class)
    mean, std = channel_stats(train.images)
    return Dataset(name="tiny", train=train, val=split(per_class // 4), test=split(per_class // 4),
                   num_classes=num_classes, class_names=tuple(map(str, range(num_classes))),
                   mean=mean, std=std)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """A LeNet-5 config sized for `tiny_dataset` (a few seconds an epoch on one core)."""
    c = base_config()
    c.batch_size = 32
    c.eval_batch_size = 64
    c.max_epochs = 3
    c.patience = 10
    c.progress = False
    c.update(overrides)
    return c


def small_study(**overrides) -> ml_collections.ConfigDict:
    """A whole study (train, compress, analyse, report) sized for `tiny_dataset`: 2 members, the
    fast analyses, a coarse pruning grid."""
    config = tiny_config(population=2, max_epochs=2, **overrides)
    config.compress.sparsity_step = 0.1
    config.compress.calibration_images = 64
    config.compress.variants = ("pruned", "w8a8", "pruned_w8a8")
    config.analysis.analyses = "classes,calibration,saliency,gradcam,hooker"
    config.analysis.saliency.images = 48
    config.analysis.gradcam.images = 48
    config.analysis.embeddings.classes = 4
    config.analysis.embeddings.per_class = 10
    return config
