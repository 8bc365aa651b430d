"""Tests for ptqaudit.data: every loader checked against arrays built independently with NumPy."""

import hashlib
import io
import pickle
import shutil
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptqaudit import data
from ptqaudit.data import DataConfig, Dataset, check_input_shape, cifar10_search_dirs, default_cache_dir, load_dataset
from ptqaudit.errors import PtqauditError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """Keep tests away from the user's cache and $PTQAUDIT_DATA."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("PTQAUDIT_DATA", raising=False)


def write_fake_cifar(folder: Path, per_batch: int = 20, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A cifar-10-batches-py folder with the official layout; returns {file: (data, labels)}."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, file)
    batches = {}
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        pixels = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch)
        with open(folder / name, "wb") as file:
            pickle.dump({"data": pixels, "labels": [int(v) for v in labels], "batch_label": name}, file)
        batches[name] = (pixels, labels)
    return batches


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def first_k_per_class_round_robin(labels: np.ndarray, limit: int) -> np.ndarray:
    """Reference for --limit, written as the plain loop the spec describes."""
    per_class = {c: [i for i, label in enumerate(labels) if label == c] for c in sorted(set(labels.tolist()))}
    chosen = []
    round_index = 0
    while len(chosen) < limit:
        for c in sorted(per_class):
            if round_index < len(per_class[c]) and len(chosen) < limit:
                chosen.append(per_class[c][round_index])
        round_index += 1
    return np.array(sorted(chosen))


# --- digits -------------------------------------------------------------------------


def test_digits_matches_sklearn_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.3, stratify=digits.target, random_state=0
    )
    test = load_dataset(DataConfig("digits"))
    train = load_dataset(DataConfig("digits", split="train"))
    assert (test.name, train.name) == ("digits/test", "digits/train")
    assert test.x.shape == (540, 1, 8, 8) and train.x.shape == (1257, 1, 8, 8)
    assert test.x.dtype == np.float32 and test.y.dtype == np.int64
    assert test.x.flags.c_contiguous
    assert test.x.min() == 0.0 and test.x.max() == 1.0
    np.testing.assert_array_equal(test.x[:, 0], (x_test / 16).astype(np.float32))
    np.testing.assert_array_equal(train.y, y_train)
    np.testing.assert_array_equal(test.y, y_test)
    assert test.classes == [str(d) for d in range(10)]


def test_digits_is_deterministic_and_stratified():
    first, second = load_dataset(DataConfig("digits")), load_dataset(DataConfig("digits"))
    np.testing.assert_array_equal(first.x, second.x)
    np.testing.assert_array_equal(first.y, second.y)
    train = load_dataset(DataConfig("digits", split="train"))
    whole = np.bincount(np.concatenate([first.y, train.y]), minlength=10)
    in_test = np.bincount(first.y, minlength=10)
    assert np.all(np.abs(in_test - 0.3 * whole) <= 1)


# --- limit ----------------------------------------------------------------------------


def test_limit_is_class_balanced_round_robin():
    full = load_dataset(DataConfig("digits"))
    subset = load_dataset(DataConfig("digits", limit=25))
    assert len(subset) == 25
    # 25 over 10 classes: the first five classes get a third example.
    assert np.bincount(subset.y, minlength=10).tolist() == [3] * 5 + [2] * 5
    expected = first_k_per_class_round_robin(full.y, 25)
    np.testing.assert_array_equal(subset.y, full.y[expected])
    np.testing.assert_array_equal(subset.x, full.x[expected])
    again = load_dataset(DataConfig("digits", limit=25))
    np.testing.assert_array_equal(again.x, subset.x)


def test_limit_skips_exhausted_classes(tmp_path):
    labels = np.array([1, 1, 0, 1, 2, 1, 1, 1, 2, 1])
    x = np.arange(len(labels), dtype=np.uint8).repeat(4).reshape(-1, 1, 2, 2)
    np.savez(tmp_path / "uneven.npz", x=x, y=labels)
    subset = load_dataset(DataConfig(str(tmp_path / "uneven.npz"), limit=6))
    expected = first_k_per_class_round_robin(labels, 6)
    assert expected.tolist() == [0, 1, 2, 3, 4, 8]
    np.testing.assert_array_equal(subset.x[:, 0, 0, 0] * 255, expected)
    assert np.bincount(subset.y).tolist() == [1, 3, 2]


def test_limit_larger_than_dataset_keeps_everything_and_nonpositive_is_rejected():
    assert len(load_dataset(DataConfig("digits", limit=10_000))) == 540
    with pytest.raises(PtqauditError, match="--limit"):
        load_dataset(DataConfig("digits", limit=0))


# --- .npz -----------------------------------------------------------------------------


@pytest.fixture
def pixels_nchw() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(6, 3, 4, 5), dtype=np.uint8)


def test_npz_nchw_uint8(tmp_path, pixels_nchw):
    np.savez(tmp_path / "d.npz", x=pixels_nchw, y=np.array([0, 1, 2, 0, 1, 2]))
    dataset = load_dataset(DataConfig(str(tmp_path / "d.npz")))
    assert dataset.name == "d.npz" and dataset.classes == ["0", "1", "2"]
    np.testing.assert_array_equal(dataset.x, pixels_nchw.astype(np.float32) / np.float32(255))
    assert dataset.y.dtype == np.int64


def test_npz_nhwc_and_keras_style_split_keys(tmp_path, pixels_nchw):
    nhwc = pixels_nchw.transpose(0, 2, 3, 1)  # (6, 4, 5, 3)
    np.savez(
        tmp_path / "k.npz",
        x_train=nhwc[:4],
        y_train=np.array([[0], [1], [0], [1]]),
        x_test=nhwc[4:],
        y_test=np.array([[1], [0]]),
        classes=np.array(["cat", "dog"]),
    )
    test = load_dataset(DataConfig(str(tmp_path / "k.npz")))
    train = load_dataset(DataConfig(str(tmp_path / "k.npz"), split="train"))
    assert test.name == "k.npz/test" and test.classes == ["cat", "dog"]
    assert test.x.shape == (2, 3, 4, 5) and test.x.flags.c_contiguous
    np.testing.assert_array_equal(test.x, pixels_nchw[4:] / np.float32(255))
    np.testing.assert_array_equal(train.y, [0, 1, 0, 1])


def test_npz_nhw_float_used_as_is(tmp_path):
    x = np.random.default_rng(2).normal(size=(5, 4, 4)).astype(np.float64) * 3  # pre-normalised, outside [0,1]
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(5))
    dataset = load_dataset(DataConfig(str(tmp_path / "f.npz")))
    assert dataset.x.shape == (5, 1, 4, 4) and dataset.x.dtype == np.float32
    np.testing.assert_array_equal(dataset.x[:, 0], x.astype(np.float32))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((2, 1, 2, 2), np.uint8), "y": np.zeros(2, int)}, r"expected x and y"),
        ({"x": np.zeros((2, 1, 2, 2), np.uint8), "y": np.zeros(3, int)}, r"2 examples but y has 3"),
        ({"x": np.zeros((2, 4), np.uint8), "y": np.zeros(2, int)}, r"shape \(2, 4\)"),
        ({"x": np.zeros((2, 1, 2, 2), np.int32), "y": np.zeros(2, int)}, r"dtype int32"),
        ({"x": np.full((2, 1, 2, 2), np.nan), "y": np.zeros(2, int)}, r"NaN"),
        ({"x": np.zeros((2, 1, 2, 2), np.uint8), "y": np.array([0.0, 1.0])}, r"integer labels"),
        ({"x": np.zeros((2, 1, 2, 2), np.uint8), "y": np.array([0, 2]), "classes": np.array(["a", "b"])}, r"0\.\.1"),
        ({"x": np.zeros((0, 1, 2, 2), np.uint8), "y": np.zeros(0, int)}, r"no examples"),
    ],
)
def test_npz_bad_input(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(PtqauditError, match=message):
        load_dataset(DataConfig(str(tmp_path / "bad.npz")))


def test_npz_that_is_not_an_archive(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PtqauditError, match="cannot read"):
        load_dataset(DataConfig(str(tmp_path / "junk.npz")))


def test_unknown_name_lists_accepted_values(tmp_path):
    with pytest.raises(PtqauditError, match="expected digits, cifar10, sst2, the path of an image folder"):
        load_dataset(DataConfig("imagenet"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PtqauditError, match="is not a folder or a .npz file"):
        load_dataset(DataConfig(str(tmp_path / "notes.txt")))
    with pytest.raises(PtqauditError, match="unknown split"):
        load_dataset(DataConfig("digits", split="val"))


# --- image folder ---------------------------------------------------------------------


def test_image_folder_rgb(tmp_path):
    rng = np.random.default_rng(3)
    images = {("dog", "b.png"): None, ("cat", "a.png"): None, ("cat", "c.PNG"): None}
    for key in images:
        images[key] = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)  # H=4, W=6
        write_png(tmp_path / "pets" / key[0] / key[1], images[key])
    (tmp_path / "pets" / "cat" / "README.txt").write_text("ignored")
    dataset = load_dataset(DataConfig(str(tmp_path / "pets")))
    assert dataset.name == "pets" and dataset.classes == ["cat", "dog"]
    assert dataset.x.shape == (3, 3, 4, 6)
    np.testing.assert_array_equal(dataset.y, [0, 0, 1])
    expected = np.stack([images[k] for k in [("cat", "a.png"), ("cat", "c.PNG"), ("dog", "b.png")]])
    np.testing.assert_array_equal(dataset.x, expected.transpose(0, 3, 1, 2) / np.float32(255))


def test_image_folder_grayscale_and_mixed_modes(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    write_png(tmp_path / "g" / "a" / "1.png", gray)
    write_png(tmp_path / "g" / "b" / "2.png", gray[::-1].copy())
    dataset = load_dataset(DataConfig(str(tmp_path / "g")))
    assert dataset.x.shape == (2, 1, 4, 5)
    np.testing.assert_array_equal(dataset.x[0, 0], gray / np.float32(255))
    write_png(tmp_path / "g" / "b" / "3.png", np.zeros((4, 5, 3), np.uint8))
    mixed = load_dataset(DataConfig(str(tmp_path / "g")))
    assert mixed.x.shape == (3, 3, 4, 5)
    np.testing.assert_array_equal(mixed.x[0], np.stack([gray] * 3) / np.float32(255))


def test_image_folder_jpeg_and_split_subfolders(tmp_path):
    for split, count in [("train", 3), ("test", 2)]:
        for i in range(count):
            path = tmp_path / "set" / split / "only" / f"{i}.JPG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(path, format="JPEG")
    test = load_dataset(DataConfig(str(tmp_path / "set")))
    train = load_dataset(DataConfig(str(tmp_path / "set"), split="train"))
    assert test.name == "set/test" and len(test) == 2 and len(train) == 3
    assert test.x.shape == (2, 3, 8, 8)


def test_image_folder_mixed_sizes_names_both_files(tmp_path):
    write_png(tmp_path / "m" / "a" / "small.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "m" / "b" / "big.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(PtqauditError, match=r"small\.png is 4x4 \(WxH\) but .*big\.png is 4x5"):
        load_dataset(DataConfig(str(tmp_path / "m")))


def test_image_folder_empty_and_classless(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PtqauditError, match="no class sub-folders"):
        load_dataset(DataConfig(str(tmp_path / "empty")))
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(PtqauditError, match="has no .png, .jpg or .jpeg images"):
        load_dataset(DataConfig(str(tmp_path / "empty")))


def test_image_folder_corrupt_files_are_named(tmp_path):
    write_png(tmp_path / "c" / "a" / "ok.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "c" / "a" / "junk.png").write_bytes(b"definitely not a png")
    with pytest.raises(PtqauditError, match=r"cannot read image .*junk\.png"):
        load_dataset(DataConfig(str(tmp_path / "c")))
    (tmp_path / "c" / "a" / "junk.png").unlink()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64), np.uint8)).save(buffer, format="PNG")
    (tmp_path / "c" / "a" / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(PtqauditError, match=r"cut\.png"):
        load_dataset(DataConfig(str(tmp_path / "c")))


# --- cifar10 --------------------------------------------------------------------------


def test_cifar10_test_and_train_splits(tmp_path):
    batches = write_fake_cifar(tmp_path / "root" / "cifar-10-batches-py")
    test = load_dataset(DataConfig("cifar10", root=str(tmp_path / "root")))
    assert test.name == "cifar10/test" and test.classes == CIFAR_CLASSES
    pixels, labels = batches["test_batch"]
    np.testing.assert_array_equal(test.x, pixels.reshape(-1, 3, 32, 32) / np.float32(255))
    np.testing.assert_array_equal(test.y, labels)
    train = load_dataset(DataConfig("cifar10", root=str(tmp_path / "root"), split="train"))
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    assert train.x.shape == (100, 3, 32, 32) and train.x.flags.c_contiguous
    np.testing.assert_array_equal(train.y, np.concatenate([batches[n][1] for n in train_names]))
    np.testing.assert_array_equal(
        train.x[-20:], batches["data_batch_5"][0].reshape(-1, 3, 32, 32) / np.float32(255)
    )


def test_cifar10_train_requires_all_five_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(folder)
    (folder / "data_batch_3").unlink()
    assert len(load_dataset(DataConfig("cifar10", root=str(folder)))) == 20  # test split unaffected
    with pytest.raises(PtqauditError, match="lacks data_batch_3"):
        load_dataset(DataConfig("cifar10", root=str(folder), split="train"))


def test_cifar10_search_order(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path / "from-root" / "cifar-10-batches-py", per_batch=11)
    write_fake_cifar(tmp_path / "from-env" / "cifar-10-batches-py", per_batch=12)
    write_fake_cifar(default_cache_dir() / "cifar-10-batches-py", per_batch=13)
    assert len(load_dataset(DataConfig("cifar10"))) == 13
    monkeypatch.setenv("PTQAUDIT_DATA", str(tmp_path / "from-env"))
    assert len(load_dataset(DataConfig("cifar10"))) == 12
    assert len(load_dataset(DataConfig("cifar10", root=str(tmp_path / "from-root")))) == 11
    # The env variable may also name the batches folder itself.
    monkeypatch.setenv("PTQAUDIT_DATA", str(tmp_path / "from-env" / "cifar-10-batches-py"))
    assert len(load_dataset(DataConfig("cifar10"))) == 12
    assert cifar10_search_dirs(str(tmp_path / "r")) == [
        tmp_path / "r",
        tmp_path / "from-env" / "cifar-10-batches-py",
        tmp_path / "xdg-cache" / "ptqaudit",
    ]


def test_default_cache_dir_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "ptqaudit"


def test_cifar10_missing_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQAUDIT_DATA", str(tmp_path / "env-dir"))
    with pytest.raises(PtqauditError) as caught:
        load_dataset(DataConfig("cifar10", root=str(tmp_path / "root-dir")))
    message = str(caught.value)
    assert "\n" not in message
    for expected in [
        f"--data-root {tmp_path / 'root-dir'}",
        f"$PTQAUDIT_DATA {tmp_path / 'env-dir'}",
        str(tmp_path / "xdg-cache" / "ptqaudit"),
        "--download",
    ]:
        assert expected in message


@pytest.fixture
def fake_archive(tmp_path) -> Path:
    """A small tar.gz laid out like the official cifar-10-python.tar.gz."""
    write_fake_cifar(tmp_path / "archive-src" / "cifar-10-batches-py", per_batch=7)
    archive = tmp_path / "fake-cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "archive-src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_download_with_patched_fetch(tmp_path, monkeypatch, fake_archive):
    fetched = []

    def fake_fetch(url, destination):
        fetched.append(url)
        shutil.copyfile(fake_archive, destination)

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    monkeypatch.setattr(data, "CIFAR10_MD5", md5_of(fake_archive))
    target = tmp_path / "dl"
    dataset = load_dataset(DataConfig("cifar10", root=str(target), download=True))
    assert len(dataset) == 7 and fetched == [data.CIFAR10_URL]
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    load_dataset(DataConfig("cifar10", root=str(target), download=True))
    assert len(fetched) == 1  # found, not fetched again
    # Without --data-root the download goes to the cache folder.
    load_dataset(DataConfig("cifar10", download=True))
    assert (default_cache_dir() / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar10_download_checksum_mismatch(tmp_path, monkeypatch, fake_archive):
    monkeypatch.setattr(data, "_fetch", lambda url, destination: shutil.copyfile(fake_archive, destination))
    target = tmp_path / "dl"
    with pytest.raises(PtqauditError, match="checksum"):
        load_dataset(DataConfig("cifar10", root=str(target), download=True))
    assert list(target.iterdir()) == []  # nothing half-written left behind


def test_cifar10_download_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(PtqauditError, match="could not download .*no route to host"):
        load_dataset(DataConfig("cifar10", root=str(tmp_path / "dl"), download=True))
    assert list((tmp_path / "dl").iterdir()) == []


def test_cifar10_download_refuses_escaping_members(tmp_path, monkeypatch):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        payload = b"gotcha"
        member = tarfile.TarInfo("../escaped.txt")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    monkeypatch.setattr(data, "_fetch", lambda url, destination: shutil.copyfile(evil, destination))
    monkeypatch.setattr(data, "CIFAR10_MD5", md5_of(evil))
    with pytest.raises(PtqauditError, match="unsafe member"):
        load_dataset(DataConfig("cifar10", root=str(tmp_path / "dl"), download=True))
    assert not (tmp_path / "escaped.txt").exists()
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["cifar-10-python.tar.gz"]


def test_real_cifar10_test_split(cifar10_root):
    dataset = load_dataset(DataConfig("cifar10", root=cifar10_root))
    assert dataset.x.shape == (10000, 3, 32, 32) and dataset.x.dtype == np.float32
    assert np.bincount(dataset.y).tolist() == [1000] * 10
    assert dataset.classes == CIFAR_CLASSES
    assert 0.0 <= dataset.x.min() and dataset.x.max() <= 1.0


# --- normalisation, shapes, batches ---------------------------------------------------


def test_mean_std_per_channel(tmp_path):
    batches = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    dataset = load_dataset(DataConfig("cifar10", root=str(tmp_path), mean=mean, std=std))
    scaled = batches["test_batch"][0].reshape(-1, 3, 32, 32) / 255.0
    expected = (scaled - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(dataset.x, expected, rtol=0, atol=2e-6)
    assert dataset.x.dtype == np.float32 and dataset.x.flags.c_contiguous


def test_mean_std_broadcast_and_alone(tmp_path):
    plain = load_dataset(DataConfig("digits"))
    one = load_dataset(DataConfig("digits", mean=(0.5,), std=(0.25,)))
    np.testing.assert_allclose(one.x, (plain.x.astype(np.float64) - 0.5) / 0.25, atol=1e-6)
    only_mean = load_dataset(DataConfig("digits", mean=(0.5,)))
    np.testing.assert_allclose(only_mean.x, plain.x - 0.5, atol=1e-7)
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    rgb = load_dataset(DataConfig("cifar10", root=str(tmp_path)))
    broadcast = load_dataset(DataConfig("cifar10", root=str(tmp_path), mean=(0.5,), std=(2.0,)))
    np.testing.assert_allclose(broadcast.x, (rgb.x - 0.5) / 2.0, atol=1e-6)


@pytest.mark.parametrize(
    "mean, std, message",
    [
        ((0.1, 0.2), None, r"--mean has 2 values but dataset digits/test has 1 channel"),
        (None, (0.0,), r"--std values must be > 0"),
        (None, (-1.0,), r"--std values must be > 0"),
        ((float("nan"),), None, r"finite"),
    ],
)
def test_mean_std_rejected(mean, std, message):
    with pytest.raises(PtqauditError, match=message):
        load_dataset(DataConfig("digits", mean=mean, std=std))


def test_check_input_shape():
    dataset = load_dataset(DataConfig("digits", limit=10))
    for fits in (["batch", 1, 8, 8], [None, 1, 8, 8], [1, 1, 8, 8], ["N", 1, "h", -1], [0, np.int64(1), 8, 8]):
        check_input_shape(dataset, fits)
    with pytest.raises(PtqauditError) as caught:
        check_input_shape(dataset, ["batch", 3, 32, 32])
    assert str(caught.value) == "model expects input [batch, 3, 32, 32] but dataset digits/test gives [N, 1, 8, 8]"
    with pytest.raises(PtqauditError, match=r"model expects input \[\?, 64\]"):
        check_input_shape(dataset, [None, 64])


def test_batches_in_order_last_one_smaller():
    dataset = Dataset("toy", np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1), np.arange(10), ["a"])
    batches = list(dataset.batches(4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), dataset.x)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), dataset.y)
    with pytest.raises(PtqauditError, match="batch size"):
        next(dataset.batches(0))
