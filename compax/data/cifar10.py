"""CIFAR-10: 10 classes, 50,000 train and 10,000 test 32x32 images.

The offline copy `<data_dir>/cifar10/{train,test}.npz` stores each image as a JPEG file; decoding
them is checked against `decoded_sha256.json` and cached as .npy in the cache folder, reused while
its hash still matches. Online, `download=True` takes the (lossless) images from the
tensorflow-datasets catalog instead.
"""

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from compax.data import files, splits
from compax.data.dataset import Dataset, Split
from compax.errors import UserError

NAME = "cifar10"
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DECODED_SHA256_FILE = f"{NAME}/decoded_sha256.json"
IMAGE_SHAPE = (32, 32, 3)
_WHAT = "CIFAR-10"
# Shape ("N": the number of images) and dtype kinds of each array of the offline copy.
SHAPES = {"jpeg": (("M",), "u1"), "offsets": (("N+1",), "iu"), "label": (("N",), "iu")}


def decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The (N, 32, 32, 3) uint8 RGB images of the JPEG files `jpeg[offsets[i]:offsets[i + 1]]`."""
    buffer = memoryview(np.ascontiguousarray(jpeg))
    images = np.empty((len(offsets) - 1, *IMAGE_SHAPE), np.uint8)
    for i, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        with Image.open(io.BytesIO(buffer[start:stop])) as image:
            pixels = np.asarray(image.convert("RGB"))
        if pixels.shape != IMAGE_SHAPE:
            raise UserError(
                f"{_WHAT} image {i} decodes to shape {pixels.shape}, not {IMAGE_SHAPE}: copy the "
                f"offline files again ({files.README_HINT})"
            )
        images[i] = pixels
    return images


def _decoded_sha256(root: Path, split: str) -> str:
    """The sha256 that `decoded_sha256.json` gives for the decoded images of `split`."""
    path = root / DECODED_SHA256_FILE
    if not path.is_file():
        raise files.missing_file_error(_WHAT, path)
    try:
        return json.loads(path.read_text())[split]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{_WHAT} file {path} has no valid hash for the {split} split ({e!r}): copy it again "
            f"from the offline copy ({files.README_HINT})"
        ) from e


def _cached_images(cache_path: Path, expected: str) -> np.ndarray | None:
    """The array cached at `cache_path` if it is there, readable and hashes to `expected`."""
    try:
        images = np.load(cache_path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return images if files.sha256_array(images) == expected else None


def _read_split(root: Path, split: str) -> Split:
    """One split of the offline copy, its images decoded (or taken from the cache) and verified."""
    path = files.verified_file(root, f"{NAME}/{split}.npz", _WHAT)
    expected = _decoded_sha256(root, split)
    cache_path = files.cache_dir() / NAME / f"{split}-{expected[:16]}.npy"
    images = _cached_images(cache_path, expected)
    if images is None:
        arrays = files.read_npz(path, ("jpeg", "offsets", "label"), _WHAT)
        files.check_arrays(path, arrays, SHAPES, _WHAT, len(CLASS_NAMES))
        images = decode_jpegs(arrays["jpeg"], arrays["offsets"])
        actual = files.sha256_array(images)
        if actual != expected:
            raise UserError(
                f"decoded {_WHAT} {split} images hash to {actual[:16]}..., not the "
                f"{expected[:16]}... of {root / DECODED_SHA256_FILE}: Pillow "
                f"{Image.__version__} decodes JPEG differently; install the Pillow of the project "
                "environment"
            )
        files.atomic_write(cache_path, lambda f: np.save(f, images, allow_pickle=False))
        labels = arrays["label"]
    else:
        labels = files.read_npz(path, ("label",), _WHAT)["label"]
    files.check_arrays(path, {"label": labels}, {"label": SHAPES["label"]}, _WHAT, len(CLASS_NAMES))
    if len(labels) != len(images):
        raise UserError(
            f"{_WHAT} file {path} has {len(labels)} labels for {len(images)} images: copy it "
            f"again from the offline copy ({files.README_HINT})"
        )
    return Split(images=images, labels=labels.astype(np.int32), boxes=None)


def load(data_dir: str | None, *, split_seed: int, val_fraction: float, download: bool) -> Dataset:
    """CIFAR-10 with `val_fraction` of each class held out of train as val (seeded; the default
    0.1 gives 500 per class)."""
    if download:
        from compax.data import online

        arrays = online.cifar10_arrays()
        full, test = (
            Split(images=a["image"], labels=a["label"].astype(np.int32), boxes=None)
            for a in (arrays["train"], arrays["test"])
        )
    else:
        root = files.find_data_dir(data_dir)
        full, test = (_read_split(root, split) for split in ("train", "test"))
    train_index, val_index = splits.stratified_split(full.labels, val_fraction, split_seed)
    return Dataset.create(NAME, CLASS_NAMES, full.take(train_index), full.take(val_index), test)
