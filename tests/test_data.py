"""Tests of compax.data: the real offline datasets (skipped where absent), file checks and cache on
tiny fake copies, splits, augmentation, synthetic_signs and the TFDS GTSRB builder."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from compax.data import (
    DATASETS,
    augment_flip_crop,
    cifar10,
    files,
    find_data_dir,
    gtsrb,
    load_dataset,
    normalize,
    splits,
    synthetic_signs,
)
from compax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Tiny fake offline copies


def _write_npz(path: Path, **arrays) -> None:
    """Saves `arrays` as the compressed .npz `path`, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def _write_checksums(root: Path) -> None:
    """Writes root/SHA256SUMS for the .npz files under `root`, in the offline copy's format."""
    names = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.npz"))
    lines = [f"{files.sha256_file(root / name)}  {name}" for name in names]
    (root / files.CHECKSUMS_FILE).write_text("\n".join(lines) + "\n")


def _jpeg_blob(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(jpeg, offsets): `images` as concatenated JPEG files, as in the offline CIFAR-10 copy."""
    blobs = []
    for image in images:
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="JPEG", quality=75)
        blobs.append(np.frombuffer(out.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return np.concatenate(blobs), offsets


def make_fake_data(root: Path) -> Path:
    """A data folder like ../shared/datasets with a few images per dataset: GTSRB with 3 classes x
    3 tracks x 4 frames, CIFAR-10 with 3 JPEGs per class (1 in test)."""
    rng = np.random.default_rng(0)
    label, track, frame = (
        a.ravel() for a in np.meshgrid(range(3), range(3), range(4), indexing="ij")
    )
    n = len(label)
    _write_npz(
        root / "gtsrb" / "train.npz",
        image=rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
        label=label.astype(np.int64),
        track=track.astype(np.int64),
        frame=frame.astype(np.int64),
        roi=np.tile(np.float32([2, 3, 30, 29]), (n, 1)),
    )
    _write_npz(
        root / "gtsrb" / "test.npz",
        image=rng.integers(0, 256, (6, 32, 32, 3), np.uint8),
        label=np.arange(6, dtype=np.int64) % 3,
        roi=np.tile(np.float32([1, 1, 31, 31]), (6, 1)),
    )
    decoded = {}
    for split, per_class in (("train", 3), ("test", 1)):
        images = rng.integers(0, 256, (10 * per_class, 32, 32, 3), np.uint8)
        jpeg, offsets = _jpeg_blob(images)
        labels = np.repeat(np.arange(10, dtype=np.int64), per_class)
        _write_npz(root / "cifar10" / f"{split}.npz", jpeg=jpeg, offsets=offsets, label=labels)
        decoded[split] = files.sha256_array(cifar10.decode_jpegs(jpeg, offsets))
    (root / cifar10.DECODED_SHA256_FILE).write_text(json.dumps(decoded))
    _write_checksums(root)
    return root


@pytest.fixture
def fake_data(tmp_path, monkeypatch) -> Path:
    """A fake data folder, with the cache folder redirected into tmp_path."""
    monkeypatch.setenv(files.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return make_fake_data(tmp_path / "datasets")


def _corrupt_byte(path: Path, position: int = -100) -> None:
    """Flips one byte of `path` and moves its modification time on."""
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    stat = path.stat()  # A new mtime even where the clock is coarse.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


# ---------------------------------------------------------------------------------------------
# Finding the data, checksums, errors


def test_find_data_dir_order(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv(files.DATA_DIR_ENV, str(env))
    assert find_data_dir(str(explicit)) == explicit
    assert find_data_dir(None) == env
    monkeypatch.delenv(files.DATA_DIR_ENV)
    assert files.DEFAULT_DATA_DIR == ROOT.parent / "shared" / "datasets"
    default = tmp_path / "default"  # a clone need not sit beside ../shared
    default.mkdir()
    monkeypatch.setattr(files, "DEFAULT_DATA_DIR", default)
    assert find_data_dir(None) == default


def test_find_data_dir_missing_names_every_way(tmp_path, monkeypatch):
    monkeypatch.setenv(files.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(UserError) as info:
        find_data_dir(str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "\n" not in message
    for part in ("nowhere", "data_dir", "COMPAX_DATA_DIR", "shared/datasets"):
        assert part in message


def test_unknown_dataset_and_bad_val_fraction():
    with pytest.raises(UserError, match="gtsrb, cifar10, synthetic_signs"):
        load_dataset("mnist")
    with pytest.raises(UserError, match="val_fraction"):
        load_dataset("synthetic_signs", val_fraction=1.5)
    assert DATASETS == ("gtsrb", "cifar10", "synthetic_signs")


def test_fake_gtsrb_loads_and_holds_out_tracks(fake_data):
    ds = load_dataset("gtsrb", data_dir=str(fake_data))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (24, 12, 6)
    assert ds.num_classes == len(ds.class_names) == 43
    assert ds.train.boxes.dtype == np.float32 and ds.val.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.val.labels), [4, 4, 4])  # one track per class
    half = load_dataset("gtsrb", data_dir=str(fake_data), val_fraction=0.5)
    np.testing.assert_array_equal(np.bincount(half.val.labels), [8, 8, 8])
    other_seeds = (load_dataset("gtsrb", data_dir=str(fake_data), split_seed=s) for s in (1, 2, 3))
    assert any(not np.array_equal(o.val.images, ds.val.images) for o in other_seeds)


def test_checksum_mismatch_names_the_file(fake_data):
    path = fake_data / "gtsrb" / "train.npz"
    _corrupt_byte(path)
    with pytest.raises(UserError, match="train.npz fails its checksum") as info:
        load_dataset("gtsrb", data_dir=str(fake_data))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_verified_file_is_hashed_once_per_version(fake_data, monkeypatch):
    load_dataset("gtsrb", data_dir=str(fake_data))

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    with monkeypatch.context() as m:
        m.setattr(files, "sha256_file", no_hashing)
        load_dataset("gtsrb", data_dir=str(fake_data))  # Both files stamped: no hashing.
    _corrupt_byte(fake_data / "gtsrb" / "test.npz")
    with pytest.raises(UserError, match="test.npz fails its checksum"):
        load_dataset("gtsrb", data_dir=str(fake_data))


def test_missing_file_says_how_to_get_it(fake_data):
    (fake_data / "gtsrb" / "test.npz").unlink()
    with pytest.raises(UserError, match="GTSRB file .*test.npz is missing") as info:
        load_dataset("gtsrb", data_dir=str(fake_data))
    for part in ("COMPAX_DATA_DIR", "data_dir", "download=True", "README"):
        assert part in str(info.value)


def test_missing_checksums_file(fake_data):
    (fake_data / files.CHECKSUMS_FILE).unlink()
    with pytest.raises(UserError, match="SHA256SUMS is missing"):
        load_dataset("gtsrb", data_dir=str(fake_data))


def test_unreadable_npz_is_a_user_error(fake_data):
    (fake_data / "gtsrb" / "test.npz").write_bytes(b"not a zip file")
    _write_checksums(fake_data)  # Matching checksum, unreadable content.
    with pytest.raises(UserError, match="test.npz cannot be read"):
        load_dataset("gtsrb", data_dir=str(fake_data))


def test_npz_lacking_an_array_is_a_user_error(fake_data):
    _write_npz(fake_data / "gtsrb" / "test.npz", image=np.zeros((1, 32, 32, 3), np.uint8))
    _write_checksums(fake_data)
    with pytest.raises(UserError, match="lacks the arrays"):
        load_dataset("gtsrb", data_dir=str(fake_data))


def test_cifar10_decode_is_cached_and_reused(fake_data, monkeypatch):
    first = load_dataset("cifar10", data_dir=str(fake_data))
    assert (len(first.train), len(first.val), len(first.test)) == (20, 10, 10)
    cached = sorted((files.cache_dir() / "cifar10").glob("*.npy"))
    assert [p.name.split("-")[0] for p in cached] == ["test", "train"]

    def no_decoding(*args):
        raise AssertionError("decoded again despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(cifar10, "decode_jpegs", no_decoding)
        again = load_dataset("cifar10", data_dir=str(fake_data))
    np.testing.assert_array_equal(again.train.images, first.train.images)

    np.save(cached[1], np.zeros((30, 32, 32, 3), np.uint8))  # A stale cache is decoded again.
    stale = load_dataset("cifar10", data_dir=str(fake_data))
    np.testing.assert_array_equal(stale.train.images, first.train.images)


def test_cifar10_decode_mismatch_is_a_user_error(fake_data):
    (fake_data / cifar10.DECODED_SHA256_FILE).write_text(json.dumps({"train": "0" * 64}))
    with pytest.raises(UserError, match="decoded CIFAR-10 train images hash to"):
        load_dataset("cifar10", data_dir=str(fake_data))


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed here"
)
def test_download_without_tensorflow_says_what_to_install():
    for name in ("gtsrb", "cifar10"):
        with pytest.raises(UserError, match="pip install tensorflow"):
            load_dataset(name, download=True)


def test_offline_path_imports_no_tensorflow(fake_data):
    code = (
        "import sys; from compax.data import load_dataset; "
        f"load_dataset('gtsrb', data_dir={str(fake_data)!r}); "
        f"load_dataset('cifar10', data_dir={str(fake_data)!r}); "
        "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# The real offline copies (skipped where ../shared/datasets is absent)


def _real_data_dir() -> Path:
    """The real offline data folder, or skip the test."""
    try:
        return find_data_dir(None)
    except UserError as e:
        pytest.skip(f"the offline datasets are not on this machine: {e}")


@pytest.fixture(scope="module")
def real_gtsrb():
    return load_dataset("gtsrb", data_dir=str(_real_data_dir()))


@pytest.fixture(scope="module")
def real_gtsrb_groups():
    root = _real_data_dir()
    arrays = files.read_npz(root / "gtsrb" / "train.npz", ("label", "track", "roi"), "GTSRB")
    return arrays["label"], arrays["track"], arrays["roi"]


@pytest.fixture(scope="module")
def real_cifar10():
    return load_dataset("cifar10", data_dir=str(_real_data_dir()))


def test_real_gtsrb_counts(real_gtsrb):
    ds = real_gtsrb
    assert len(ds.train) + len(ds.val) == 39209 and len(ds.test) == 12630
    assert ds.num_classes == 43 and ds.class_names[14] == "stop"
    counts = np.bincount(ds.train.labels, minlength=43) + np.bincount(ds.val.labels, minlength=43)
    test_counts = np.bincount(ds.test.labels, minlength=43)
    assert (counts[0], test_counts[0], counts[2], test_counts[2]) == (210, 60, 2250, 750)
    assert ds.train.images.shape[1:] == (32, 32, 3) and ds.test.boxes.shape == (12630, 4)
    for split in (ds.train, ds.val, ds.test):
        boxes = split.boxes
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 32).all()
        assert (boxes[:, :2] < boxes[:, 2:]).all()
    assert ds.mean.shape == ds.std.shape == (3,) and ds.mean.dtype == np.float32


def test_real_gtsrb_val_holds_out_whole_tracks(real_gtsrb, real_gtsrb_groups):
    labels, tracks, roi = real_gtsrb_groups
    train, val = splits.group_split(labels, tracks, 0.1, seed=0)
    np.testing.assert_array_equal(real_gtsrb.val.labels, labels[val])  # What load_dataset used.
    np.testing.assert_array_equal(real_gtsrb.val.boxes, roi[val])
    train_groups = set(zip(labels[train].tolist(), tracks[train].tolist(), strict=True))
    val_groups = set(zip(labels[val].tolist(), tracks[val].tolist(), strict=True))
    assert not train_groups & val_groups
    assert len(train_groups | val_groups) == 1307
    assert 0.08 < len(val_groups) / 1307 < 0.12
    assert set(labels[val].tolist()) == set(labels[train].tolist()) == set(range(43))


def test_real_gtsrb_split_depends_on_seed_only(real_gtsrb_groups):
    labels, tracks, _ = real_gtsrb_groups
    a, b, c = (splits.group_split(labels, tracks, 0.1, seed)[1] for seed in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_real_cifar10_counts(real_cifar10):
    ds = real_cifar10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (45000, 5000, 10000)
    np.testing.assert_array_equal(np.bincount(ds.val.labels), [500] * 10)
    np.testing.assert_array_equal(np.bincount(ds.train.labels), [4500] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [1000] * 10)
    assert ds.train.boxes is None and ds.class_names[0] == "airplane"


def test_real_cifar10_test_decodes_to_published_hash():
    root = _real_data_dir()
    arrays = files.read_npz(root / "cifar10" / "test.npz", ("jpeg", "offsets"), "CIFAR-10")
    expected = json.loads((root / cifar10.DECODED_SHA256_FILE).read_text())["test"]
    assert files.sha256_array(cifar10.decode_jpegs(arrays["jpeg"], arrays["offsets"])) == expected


@pytest.mark.slow
def test_real_cifar10_full_decode_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv(files.CACHE_DIR_ENV, str(tmp_path))
    ds = load_dataset("cifar10", data_dir=str(_real_data_dir()))  # Raises on a hash mismatch.
    assert len(ds.train) + len(ds.val) == 50000


# ---------------------------------------------------------------------------------------------
# Splits


def test_group_split_never_shares_a_group_and_is_stratified():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 3000)
    groups = rng.integers(0, 40, 3000)
    train, val = splits.group_split(labels, groups, 0.25, seed=3)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(3000))
    for k in range(5):
        in_val = set(groups[val][labels[val] == k].tolist())
        in_train = set(groups[train][labels[train] == k].tolist())
        assert not in_val & in_train and len(in_val) == 10 and len(in_train) == 30


def test_group_split_keeps_one_group_of_each_part():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    groups = np.array([0, 0, 1, 0, 1, 2, 3])
    _, val = splits.group_split(labels, groups, 0.01, seed=0)
    assert sorted(set(labels[val].tolist())) == [0, 1]
    train, _ = splits.group_split(labels, groups, 0.99, seed=0)
    assert sorted(set(labels[train].tolist())) == [0, 1]


def test_stratified_split_sizes_and_seeds():
    labels = np.repeat(np.arange(4), [100, 50, 20, 10])
    train, val = splits.stratified_split(labels, 0.1, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[val]), [10, 5, 2, 1])
    assert len(train) + len(val) == 180 and not set(train.tolist()) & set(val.tolist())
    np.testing.assert_array_equal(val, splits.stratified_split(labels, 0.1, seed=0)[1])
    assert not np.array_equal(val, splits.stratified_split(labels, 0.1, seed=1)[1])


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_normalize_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), np.uint8)
    mean, std = np.float32([0.5, 0.4, 0.3]), np.float32([0.2, 0.25, 0.3])
    out = jax.jit(normalize)(images, mean, std)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)


def _find_crop(out: np.ndarray, image: np.ndarray, pad: int) -> tuple[bool, int, int]:
    """(flipped, dy, dx) such that `out` is that crop of the zero-padded, maybe flipped `image`."""
    h, w = image.shape[:2]
    for flipped in (False, True):
        source = image[:, ::-1] if flipped else image
        padded = np.pad(source, ((pad, pad), (pad, pad), (0, 0)))
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if np.array_equal(padded[dy : dy + h, dx : dx + w], out):
                    return flipped, dy, dx
    raise AssertionError("output is no crop of the padded (flipped) input")


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augment_flip_crop_is_a_crop_of_the_padded_input(dtype):
    images = np.random.default_rng(0).integers(1, 256, (300, 8, 8, 3)).astype(dtype)
    out = np.asarray(
        jax.jit(augment_flip_crop, static_argnames="pad")(jax.random.key(0), images, pad=2)
    )
    assert out.shape == images.shape and out.dtype == dtype
    found = np.array([_find_crop(o, i, pad=2) for o, i in zip(out, images, strict=True)])
    assert 0.4 < found[:, 0].mean() < 0.6
    assert len({(dy, dx) for _, dy, dx in found}) == 25  # Every offset occurs.


def test_augment_flip_crop_determinism_and_vmap():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
    key, augment = jax.random.key(7), jax.jit(augment_flip_crop)
    a, b = augment(key, images), augment(key, images)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augment(jax.random.key(8), images))
    keys = jax.random.split(key, 3)
    batched = jax.jit(jax.vmap(augment_flip_crop, in_axes=(0, None)))(keys, images)
    assert batched.shape == (3, 4, 32, 32, 3)
    np.testing.assert_array_equal(batched[1], augment(keys[1], images))


def test_augment_flip_crop_rejects_bad_input():
    with pytest.raises(UserError, match="batch"):
        augment_flip_crop(jax.random.key(0), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(UserError, match="pad"):
        augment_flip_crop(jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8), pad=-1)


# ---------------------------------------------------------------------------------------------
# synthetic_signs


@pytest.fixture(scope="module")
def synthetic():
    start = time.perf_counter()
    ds = load_dataset("synthetic_signs")
    return ds, time.perf_counter() - start


def test_synthetic_signs_dataset(synthetic):
    ds, seconds = synthetic
    assert len(ds.train) + len(ds.val) == synthetic_signs.NUM_TRAIN
    assert len(ds.test) == synthetic_signs.NUM_TEST
    assert 10 <= ds.num_classes == len(ds.class_names) <= 16
    counts = np.bincount(ds.train.labels) + np.bincount(ds.val.labels)
    assert np.all(np.diff(counts) < 0) and 8 < counts[0] / counts[-1] < 12
    np.testing.assert_allclose(np.bincount(ds.val.labels) / counts, 0.1, atol=0.01)
    assert seconds < 60, f"generating synthetic_signs took {seconds:.1f} s"


def test_synthetic_signs_boxes_lie_inside_the_image(synthetic):
    ds, _ = synthetic
    for split in (ds.train, ds.test):
        boxes = split.boxes
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 32).all()
        sizes = boxes[:, 2:] - boxes[:, :2]
        assert (sizes >= 8).all() and len(np.unique(boxes, axis=0)) > 100


def test_synthetic_signs_determinism_and_variety():
    a, b, c = (synthetic_signs.generate(200, seed) for seed in (5, 5, 6))
    for x, y in ((a.images, b.images), (a.labels, b.labels), (a.boxes, b.boxes)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, c.images)
    flat = a.images.reshape(200, -1)
    assert len(np.unique(flat, axis=0)) == 200
    assert len(np.unique(a.labels)) == len(synthetic_signs.CLASSES)


def test_synthetic_signs_class_counts():
    counts = synthetic_signs.class_counts(12000)
    assert counts.sum() == 12000 and np.all(np.diff(counts) < 0)
    assert counts[0] / counts[-1] == pytest.approx(synthetic_signs.IMBALANCE, rel=0.02)


def test_quickstart_training_learns_every_synthetic_signs_class(synthetic, tmp_path):
    """The quickstart's training (configs/quickstart.py: 2 LeNet-5 members, 15 epochs) recalls
    every class of synthetic_signs on the test split above 50% (mean over the members).

    When the stop sign was a red octagon drawn like the red "no entry" disc (an outline within 0.6
    pixel of a circle's), both members recalled it 0% (every stop sign predicted "no entry"), and
    the square "one way" sign with the same upward arrow as the circular "ahead only" 30%. With the
    stop sign's white rim and the one-way sign's rightward arrow, the least recalled class measured
    71% (AMD EPYC, 2 cores); 50% leaves room for other CPUs' numerics, and a class drawn like
    another fails it."""
    from compax.member_vmap import make_predict, model_apply
    from compax.train import fit

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "configs" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.progress = False
    ds, _ = synthetic
    trained = fit(config, ds, tmp_path, progress=False)
    predict = make_predict(model_apply(trained.model), ds.mean, ds.std, config.eval_batch_size,
                           config.population)
    predicted = np.asarray(predict(trained.variables, ds.test.images)).argmax(-1)
    labels = ds.test.labels
    recall = np.array([[np.mean(p[labels == k] == k) for k in range(ds.num_classes)]
                       for p in predicted]).mean(axis=0)
    worst = int(recall.argmin())
    assert recall[worst] > 0.5, (f"class {worst} ({ds.class_names[worst]}) recalled"
                                 f" {recall[worst]:.0%}: {np.round(recall, 2).tolist()}")


# ---------------------------------------------------------------------------------------------
# TFDS GTSRB builder, on a fake folder of extracted archives


def _write_ppm_folder(root: Path) -> dict[str, Path]:
    """The three official GTSRB archives as if extracted under `root`, with 2 classes x 3 train
    images (40x30) and 2 test images (45x50); returns the folder of each archive."""
    rng = np.random.default_rng(0)
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
    train_images = root / "train" / "GTSRB" / "Final_Training" / "Images"
    for label in (0, 1):
        folder = train_images / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = [header]
        for track, frame in ((0, 0), (0, 1), (1, 0)):
            name = f"{track:05d}_{frame:05d}.ppm"
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).save(folder / name)
            rows.append(f"{name};40;30;4;3;35;26;{label}")
        (folder / f"GT-{label:05d}.csv").write_text("\n".join(rows) + "\n")
    test_images = root / "test" / "GTSRB" / "Final_Test" / "Images"
    test_images.mkdir(parents=True)
    rows = [header]
    for i, label in enumerate((1, 0)):
        Image.fromarray(rng.integers(0, 256, (50, 45, 3), np.uint8)).save(
            test_images / f"{i:05d}.ppm"
        )
        rows.append(f"{i:05d}.ppm;45;50;5;5;40;44;{label}")
    (root / "test_gt").mkdir()
    (root / "test_gt" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return {"train": root / "train", "test": root / "test", "test_gt": root / "test_gt"}


def test_tfds_gtsrb_examples_from_extracted_archives(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from compax.data import tfds_gtsrb

    extracted = _write_ppm_folder(tmp_path)
    train = list(tfds_gtsrb.generate_examples("train", extracted))
    assert [k for k, _ in train][:2] == ["00000/00000_00000.ppm", "00000/00000_00001.ppm"]
    assert [(e["label"], e["track"], e["frame"]) for _, e in train] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 0),
        (1, 0, 0),
        (1, 0, 1),
        (1, 1, 0),
    ]
    key, first = train[0]
    source = Image.open(extracted["train"] / "GTSRB" / "Final_Training" / "Images" / key)
    expected = np.asarray(source.resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(first["image"], expected)
    np.testing.assert_allclose(first["roi"], [4 * 32 / 40, 3 * 32 / 30, 36 * 32 / 40, 27 * 32 / 30])
    test = list(tfds_gtsrb.generate_examples("test", extracted))
    assert [(k, e["label"], e["track"]) for k, e in test] == [
        ("00000.ppm", 1, -1),
        ("00001.ppm", 0, -1),
    ]
    assert test[0][1]["image"].shape == (32, 32, 3) and test[0][1]["roi"].dtype == np.float32

    builder = tfds_gtsrb.CompaxGtsrb(data_dir=str(tmp_path / "tfds"))
    features = builder.info.features
    assert set(features.keys()) == set(first.keys())
    assert builder.info.features["label"].names == list(gtsrb.CLASS_NAMES)

    class FakeDownloadManager:
        """Hands out the fake folder instead of downloading."""

        def download_and_extract(self, urls):
            assert sorted(urls.values()) == sorted(
                tfds_gtsrb.URL + f for f in tfds_gtsrb.ARCHIVES.values()
            )
            return extracted

    generators = builder._split_generators(FakeDownloadManager())
    assert len(list(generators["train"])) == 6 and len(list(generators["test"])) == 2
