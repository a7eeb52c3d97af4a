"""A tensorflow-datasets builder for GTSRB at 32x32 (TFDS name "compax_gtsrb"), for the online path.

It downloads the official archives, resizes each whole image (sign plus its ~10% border) to 32x32
with bilinear filtering and keeps label, track, frame and the sign's box rescaled to 32x32: the same
arrays as the offline copy `gtsrb/{train,test}.npz`. The test split has no tracks (track = frame =
-1). Importing this module imports tensorflow_datasets; only `compax.data.online` does.
"""

import csv
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from compax.data.gtsrb_classes import CLASS_NAMES

URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
ARCHIVES = {
    "train": "GTSRB_Final_Training_Images.zip",
    "test": "GTSRB_Final_Test_Images.zip",
    "test_gt": "GTSRB_Final_Test_GT.zip",
}
SIZE = 32

Example = dict[str, int | np.ndarray]


def _example(ppm_path: Path, row: Mapping[str, str], track: int, frame: int) -> Example:
    """One annotated image: the 32x32 bilinear resize and its box `x1, y1, x2, y2` rescaled to it.
    The official Roi.X2/Roi.Y2 are inclusive; the box's x2/y2 are exclusive."""
    with Image.open(ppm_path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    roi = np.array(
        [
            int(row["Roi.X1"]) * SIZE / width,
            int(row["Roi.Y1"]) * SIZE / height,
            (int(row["Roi.X2"]) + 1) * SIZE / width,
            (int(row["Roi.Y2"]) + 1) * SIZE / height,
        ],
        np.float32,
    )
    return {
        "image": pixels,
        "label": int(row["ClassId"]),
        "track": track,
        "frame": frame,
        "roi": roi,
    }


def _rows(csv_path: Path) -> Iterator[dict[str, str]]:
    with open(csv_path, newline="") as f:
        yield from csv.DictReader(f, delimiter=";")


def generate_examples(split: str, extracted: Mapping[str, Path]) -> Iterator[tuple[str, Example]]:
    """(key, example) pairs of `split` ("train" or "test") in the official order.

    `extracted` maps each key of `ARCHIVES` to the folder its archive was extracted into: train
    images in `GTSRB/Final_Training/Images/<class>/` with `GT-<class>.csv`, test images in
    `GTSRB/Final_Test/Images/`, test labels in `GT-final_test.csv`.
    """
    if split == "train":
        images_dir = Path(extracted["train"]) / "GTSRB" / "Final_Training" / "Images"
        for class_dir in sorted(p for p in images_dir.iterdir() if p.is_dir()):
            for row in _rows(class_dir / f"GT-{class_dir.name}.csv"):
                track, frame = (int(part) for part in Path(row["Filename"]).stem.split("_"))
                key = f"{class_dir.name}/{row['Filename']}"
                yield key, _example(class_dir / row["Filename"], row, track, frame)
    elif split == "test":
        images_dir = Path(extracted["test"]) / "GTSRB" / "Final_Test" / "Images"
        for row in _rows(Path(extracted["test_gt"]) / "GT-final_test.csv"):
            yield row["Filename"], _example(images_dir / row["Filename"], row, -1, -1)
    else:
        raise ValueError(f"unknown GTSRB split {split!r}: use 'train' or 'test'")


class CompaxGtsrb(tfds.core.GeneratorBasedBuilder):
    """GTSRB, 43 classes, 39,209 train and 12,630 test images at 32x32 with label, track, frame
    and the sign's box."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Whole images resized to 32x32 (bilinear), with track, frame, box."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "track": np.int64,
                    "frame": np.int64,
                    "roi": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://benchmark.ini.rub.de/gtsrb_dataset.html",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        extracted = dl_manager.download_and_extract({k: URL + f for k, f in ARCHIVES.items()})
        return {
            split: self._generate_examples(split=split, extracted=extracted)
            for split in ("train", "test")
        }

    def _generate_examples(self, split: str, extracted: Mapping[str, Path]):
        return generate_examples(split, extracted)
