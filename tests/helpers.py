"""A tiny learnable dataset for fast training tests: each class is a coloured square at a place."""

import ml_collections
import numpy as np

from compax.config import base_config
from compax.data.dataset import Dataset, Split, channel_stats


def tiny_dataset(num_classes: int = 4, per_class: int = 48, seed: int = 0) -> Dataset:
    """Noisy 32x32 images; class c has a square of colour c at position c (train/val/test 4:1:1)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(60, 255, (num_classes, 3))

    def split(n_per_class):
        labels = np.repeat(np.arange(num_classes, dtype=np.int32), n_per_class)
        images = rng.integers(0, 90, (len(labels), 32, 32, 3)).astype(np.uint8)
        for i, c in enumerate(labels):
            y, x = 4 + 6 * (c % 4) + rng.integers(-2, 3), 4 + 6 * (c // 4) + rng.integers(-2, 3)
            images[i, y:y + 8, x:x + 8] = colours[c]
        return Split(images, labels, None)

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
