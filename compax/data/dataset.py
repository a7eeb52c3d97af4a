"""The in-memory dataset types: `Split` (images, labels, boxes) and `Dataset` (train/val/test)."""

import dataclasses

import numpy as np

from compax.errors import UserError


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One part of a dataset, as numpy arrays.

    images: (N, H, W, 3) uint8. labels: (N,) int32. boxes: (N, 4) float32 object boxes
    `x1, y1, x2, y2` in pixels (`x2`, `y2` exclusive), or None where the dataset has none.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray | None

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be (N, H, W, 3) uint8, got {self.images.shape} {self.images.dtype}"
            )
        if self.labels.shape != (n,) or self.labels.dtype != np.int32:
            raise ValueError(
                f"labels must be ({n},) int32, got {self.labels.shape} {self.labels.dtype}"
            )
        if self.boxes is not None and (
            self.boxes.shape != (n, 4) or self.boxes.dtype != np.float32
        ):
            raise ValueError(
                f"boxes must be ({n}, 4) float32, got {self.boxes.shape} {self.boxes.dtype}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Split":
        """The examples at `index` (an integer array), in that order."""
        return Split(
            images=self.images[index],
            labels=self.labels[index],
            boxes=None if self.boxes is None else self.boxes[index],
        )


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of uint8 images scaled to [0, 1], as (3,) float32.

    Computed exactly in float64 from per-channel histograms of the 256 grey levels, so it needs no
    float copy of the images.
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        weights = counts / counts.sum()
        m = weights @ levels
        mean.append(m)
        std.append(np.sqrt(weights @ (levels - m) ** 2))
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset split into train, val and test.

    mean, std: (3,) float32 per-channel mean and std of the train images scaled to [0, 1], for
    `normalize`.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def create(
        cls, name: str, class_names: tuple[str, ...], train: Split, val: Split, test: Split
    ) -> "Dataset":
        """The dataset with these parts, its mean and std computed from `train`; a part without
        images is a UserError."""
        parts = {"train": train, "val": val, "test": test}
        empty = next((part for part, split in parts.items() if not len(split)), None)
        if empty:
            sizes = ", ".join(f"{len(split)} {part}" for part, split in parts.items())
            raise UserError(
                f"the {empty} split of {name} holds no images ({sizes}): give every class two or"
                " more tracks or images (the val split holds out one or more of each) and the"
                " test split one or more"
            )
        mean, std = channel_stats(train.images)
        return cls(
            name=name,
            train=train,
            val=val,
            test=test,
            num_classes=len(class_names),
            class_names=class_names,
            mean=mean,
            std=std,
        )
