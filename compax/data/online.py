"""The online path (`download=True`): datasets fetched and prepared with tensorflow-datasets.

Only this module imports tensorflow_datasets (and `tfds_gtsrb`, which it imports), and only when
called; the offline path never imports TensorFlow. Prepared data lives in TFDS's own data folder
(`~/tensorflow_datasets` unless `TFDS_DATA_DIR` says otherwise).
"""

import numpy as np

from compax.errors import UserError


def _load(name: str, keys: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    """The `keys` arrays of the train and test splits of TFDS dataset `name`, downloaded and
    prepared on first use."""
    import tensorflow_datasets as tfds

    splits = tfds.as_numpy(tfds.load(name, split=["train", "test"], batch_size=-1))
    return {
        split: {key: np.asarray(arrays[key]) for key in keys}
        for split, arrays in zip(("train", "test"), splits, strict=True)
    }


def _require_tfds() -> None:
    """Raises a UserError saying what to install where TensorFlow or tensorflow-datasets is
    missing."""
    try:
        import tensorflow  # noqa: F401  (tensorflow-datasets needs it to prepare and read images)
        import tensorflow_datasets  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"download=True needs TensorFlow and tensorflow-datasets ({e}): "
            "pip install tensorflow tensorflow-datasets, or use the offline copy (download=False)"
        ) from e


def cifar10_arrays() -> dict[str, dict[str, np.ndarray]]:
    """CIFAR-10 from the TFDS catalog: {"train"|"test": {"image", "label"}}."""
    _require_tfds()
    return _load("cifar10", ("image", "label"))


def gtsrb_arrays() -> dict[str, dict[str, np.ndarray]]:
    """GTSRB from compax's TFDS builder: {"train"|"test": {"image", "label", "track", "frame",
    "roi"}}; the test split's track and frame are -1."""
    _require_tfds()
    from compax.data import tfds_gtsrb

    return _load(tfds_gtsrb.CompaxGtsrb.name, ("image", "label", "track", "frame", "roi"))
