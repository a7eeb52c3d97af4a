"""The datasets of the study (GTSRB, CIFAR-10) and a generated one, with splits and preprocessing.

`load_dataset(name)` returns a `Dataset` of numpy arrays with train/val/test parts. The real
datasets come from the offline copy (`find_data_dir`), checked against its checksums, or online
from tensorflow-datasets with `download=True`; TensorFlow is never imported otherwise.
"""

from compax.data import cifar10, gtsrb, synthetic_signs
from compax.data.augment import augment_flip_crop, normalize
from compax.data.dataset import Dataset, Split
from compax.data.files import find_data_dir
from compax.errors import UserError

__all__ = [
    "DATASETS",
    "DEFAULT_VAL_FRACTION",
    "Dataset",
    "Split",
    "augment_flip_crop",
    "find_data_dir",
    "load_dataset",
    "normalize",
]

_LOADERS = {
    gtsrb.NAME: gtsrb.load,
    cifar10.NAME: cifar10.load,
    synthetic_signs.NAME: synthetic_signs.load,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)
DEFAULT_VAL_FRACTION = 0.1


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    split_seed: int = 0,
    val_fraction: float | None = None,
    download: bool = False,
) -> Dataset:
    """The dataset `name` (one of `DATASETS`) with its train part split into train and val.

    The validation split is deterministic from `split_seed` and stratified by class, holding out
    `val_fraction` (default `DEFAULT_VAL_FRACTION`) of each class: GTSRB as whole tracks, so no
    physical sign is in both; CIFAR-10 (500 images per class by default) and synthetic_signs as
    single images. Test is the official test split. `data_dir`: see `find_data_dir`.
    `download=True` builds GTSRB and CIFAR-10 online with tensorflow-datasets instead of reading
    the offline copy.
    """
    if name not in _LOADERS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION
    if not 0 < val_fraction < 1:
        raise UserError(
            f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}: "
            "set --config.val_fraction, e.g. 0.1"
        )
    return _LOADERS[name](
        data_dir, split_seed=split_seed, val_fraction=val_fraction, download=download
    )
