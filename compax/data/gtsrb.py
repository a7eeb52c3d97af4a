"""GTSRB (German Traffic Sign Recognition Benchmark) at 32x32: 43 classes, 39,209 train and 12,630
test images with the sign's box.

Read from the offline copy `<data_dir>/gtsrb/{train,test}.npz`, or built online with the
tensorflow-datasets builder in `compax.data.tfds_gtsrb`. Validation holds out whole tracks (the ~30
frames of one physical sign) per class, so near-duplicates never leak from train into val.
"""

import numpy as np

from compax.data import files, splits
from compax.data.dataset import Dataset, Split
from compax.data.gtsrb_classes import CLASS_NAMES

NAME = "gtsrb"
TRAIN_KEYS = ("image", "label", "track", "frame", "roi")
TEST_KEYS = ("image", "label", "roi")
_WHAT = "GTSRB"
# Shape ("N": the number of images) and dtype kinds of each array of the offline copy.
SHAPES = {"image": (("N", 32, 32, 3), "u1"), "label": (("N",), "iu"), "track": (("N",), "iu"),
          "frame": (("N",), "iu"), "roi": (("N", 4), "fiu")}


def _read_offline(data_dir: str | None) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of both splits of the offline copy, checked against SHA256SUMS."""
    root = files.find_data_dir(data_dir)
    arrays = {}
    for split, keys in (("train", TRAIN_KEYS), ("test", TEST_KEYS)):
        path = files.verified_file(root, f"{NAME}/{split}.npz", _WHAT)
        arrays[split] = files.read_npz(path, keys, _WHAT)
        files.check_arrays(path, arrays[split], {k: SHAPES[k] for k in keys}, _WHAT, len(CLASS_NAMES))
    return arrays


def _split(arrays: dict[str, np.ndarray]) -> Split:
    """The `Split` of one split's arrays (image, label, roi)."""
    return Split(
        images=arrays["image"],
        labels=arrays["label"].astype(np.int32),
        boxes=arrays["roi"].astype(np.float32),
    )


def load(data_dir: str | None, *, split_seed: int, val_fraction: float, download: bool) -> Dataset:
    """GTSRB with `val_fraction` of each class's tracks held out of train as val (seeded)."""
    if download:
        from compax.data import online

        arrays = online.gtsrb_arrays()
    else:
        arrays = _read_offline(data_dir)
    train = arrays["train"]
    train_index, val_index = splits.group_split(
        train["label"], train["track"], val_fraction, split_seed
    )
    full = _split(train)
    return Dataset.create(
        NAME, CLASS_NAMES, full.take(train_index), full.take(val_index), _split(arrays["test"])
    )
