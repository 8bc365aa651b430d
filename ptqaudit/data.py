"""Datasets the audit runs on: cifar10 (standard folder), image folder, .npz, digits (embedded), and text
(sst2, .tsv/.csv/.jsonl, tokenized .npz; see text_data.py).

Every loader ends in the same `Dataset`: float32 NCHW pixels scaled to [0, 1] (then normalised per
channel if --mean/--std are given), or TextInputs for text, and int64 labels. Bad input raises
`PtqauditError` with one line naming what was wrong and what is accepted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import math
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ptqaudit.errors import PtqauditError
from ptqaudit.progress import Progress, track
from ptqaudit.text_data import (TextConfig, TextInputs, describe_padding, is_text_source, load_sst2, load_text_file,
                                load_token_npz)

SPLITS = ("test", "train")
SST2_CLASSES = ("negative", "positive")  # GLUE SST-2's labels 0 and 1

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_SPLIT_FILES = {
    "test": ("test_batch",),
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Pillow modes that hold one grey channel; a folder made only of these loads with C=1.
GRAYSCALE_MODES = ("1", "L", "LA")

# Examples converted to float32 (or checked) at a time: keeps temporaries small on CIFAR's 50,000 images.
_CONVERT_CHUNK = 4096
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Without a `classes` array, labels 0..max name the classes; a larger label is a damaged file
# (and naming 10^12 classes would exhaust memory).
MAX_UNNAMED_CLASSES = 100_000
_DOWNLOAD_TIMEOUT_S = 60
# Python >= 3.11.4 can also sanitise tar members itself (and 3.14 warns without a filter).
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


@dataclass(frozen=True)
class DataConfig:
    """Which examples to audit on and how to present them to the model."""

    name: str = "digits"  # "digits" | "cifar10" | "sst2" | path to an image folder, .npz, .tsv, .csv or .jsonl file
    root: str | None = None  # --data-root, for cifar10 and sst2
    split: str = "test"  # "test" | "train"
    limit: int | None = None  # deterministic, class-balanced subset of N examples
    mean: tuple[float, ...] | None = None  # --mean/--std: normalise per channel after scaling to [0,1]
    std: tuple[float, ...] | None = None
    download: bool = False  # cifar10 only: fetch the official archive if missing
    text: TextConfig = TextConfig()  # tokenizer, padding and columns, for text data

    def to_dict(self) -> dict:
        """As run.json stores it: the text settings only when they are not the defaults, so an image run's
        settings read (and --resume compares) as before text data existed."""
        values = dataclasses.asdict(self)
        if self.text == TextConfig():
            del values["text"]
        return values

    def __post_init__(self):
        if isinstance(self.text, dict):  # as a run folder's run.json holds it
            known = {k: v for k, v in self.text.items() if k in TextConfig.__dataclass_fields__}
            object.__setattr__(self, "text", TextConfig(**known))


@dataclass
class Dataset:
    """Examples in memory: x float32 NCHW (C-contiguous) images or tokenized text, y int64 class indices
    into `classes`."""

    name: str  # human label, e.g. "cifar10/test" or "digits/test"
    x: np.ndarray | TextInputs
    y: np.ndarray
    classes: list[str]

    @property
    def is_text(self) -> bool:
        return isinstance(self.x, TextInputs)

    @property
    def unit(self) -> str:
        """What one example is, in results: images, sentences, or (pre-tokenized) examples."""
        if not self.is_text:
            return "images"
        return "sentences" if self.x.texts is not None else "examples"

    @property
    def padding_note(self) -> str:
        """The padding scenario of text data, as results state it ("" for images), ending in " | "."""
        return f"{describe_padding(self.x)} | " if self.is_text else ""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One example's shape without the batch dim: (C, H, W), or (sequence length,) for text."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, limit: int) -> "Dataset":
        """A deterministic, class-balanced subset of at most `limit` examples (as --limit takes)."""
        if limit >= len(self):
            return self
        keep = _balanced_subset(self.y, limit)
        return Dataset(name=f"{self.name}[{limit}]", x=self.x[keep], y=self.y[keep], classes=self.classes)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (x, y) views in order; the last batch may be smaller."""
        if batch_size <= 0:
            raise PtqauditError(f"batch size must be a positive integer, got {batch_size}")
        for start in range(0, len(self), batch_size):
            x = self.x[start : start + batch_size]
            yield x.trimmed() if isinstance(x, TextInputs) else x, self.y[start : start + batch_size]


@dataclass
class _RawData:
    """Examples before scaling: NCHW pixels of any dtype and the divisor that maps them to [0, 1]."""

    name: str
    pixels: np.ndarray
    labels: np.ndarray
    classes: list[str]
    scale: float | None  # None: pixels are floats already, used as they are


def load_dataset(config: DataConfig) -> Dataset:
    """Load the examples `config` names, subset them (--limit) and normalise them (--mean/--std)."""
    if config.split not in SPLITS:
        raise PtqauditError(f"unknown split {config.split!r}: expected one of {', '.join(SPLITS)}")
    if config.limit is not None and config.limit <= 0:
        raise PtqauditError(f"--limit must be a positive number of examples, got {config.limit}")

    if is_text_source(config.name) or _is_token_npz(config.name):
        return _load_text(config)
    raw = _load_raw(config)
    _check_labels(raw)
    # Validate before the float conversion so a typo fails fast, even on CIFAR's train split.
    normalisation = _normalisation(config.mean, config.std, channels=raw.pixels.shape[1], name=raw.name)
    if config.limit is not None and config.limit < len(raw.labels):
        keep = _balanced_subset(raw.labels, config.limit)
        raw.pixels, raw.labels = raw.pixels[keep], raw.labels[keep]

    # Overflow is not warned about but checked right after, with a line saying what to do.
    with np.errstate(over="ignore", invalid="ignore"):
        x = _to_unit_float32(raw.pixels, raw.scale)
    if raw.scale is None and not _all_finite(x):
        raise PtqauditError(
            f"dataset {raw.name} holds NaN, infinite or out-of-range values: as float32, the model's input type "
            f"(largest {FLOAT32_MAX:.3g}), they are not finite numbers"
        )
    if normalisation is not None:
        mean, std = normalisation
        with np.errstate(over="ignore", invalid="ignore"):
            x -= mean  # in place: float32 throughout, no float64 temporaries
            x /= std
        if not _all_finite(x):
            given = " ".join(f"--{option} {','.join(f'{v:g}' for v in values)}"
                             for option, values in (("mean", config.mean), ("std", config.std)) if values is not None)
            raise PtqauditError(
                f"dataset {raw.name} is not finite in float32 after {given}: a --std near 0 or a huge --mean "
                f"overflows float32 (largest {FLOAT32_MAX:.3g}); give the data's real per-channel statistics"
            )
    return Dataset(name=raw.name, x=x, y=raw.labels, classes=raw.classes)


def _load_text(config: DataConfig) -> Dataset:
    """A text dataset, subset (--limit) like images; --mean/--std do not apply."""
    if config.mean is not None or config.std is not None:
        raise PtqauditError(f"--mean/--std normalise image channels; dataset {config.name} is text")
    if config.name == "sst2":
        inputs, labels, name = load_sst2(config.root, config.split, config.text)
        classes = list(SST2_CLASSES)
    elif Path(config.name).suffix.lower() == ".npz":
        path = Path(config.name).expanduser()
        inputs, labels, classes = _load_npz_tokens(path, config.split)
        name = path.name
    else:
        inputs, labels, name = load_text_file(Path(config.name).expanduser(), config.split, config.text)
        classes = [str(index) for index in range(int(labels.max(initial=0)) + 1)]
    if int(labels.max(initial=0)) >= len(classes):
        raise PtqauditError(f"dataset {name} has labels up to {int(labels.max())} but {len(classes)} classes")
    dataset = Dataset(name=name, x=inputs, y=labels, classes=classes)
    return dataset.subset(config.limit) if config.limit is not None else dataset


def check_input_shape(dataset: Dataset, model_input_shape: Sequence[int | str | None]) -> None:
    """Raise if the model's input shape cannot take this dataset's examples.

    Symbolic (str), unknown (None) and non-positive dimensions match anything. The first
    (batch) dimension is never compared: the caller chooses the batch size.
    """
    expected = list(model_input_shape)
    actual = dataset.x.shape
    fits = len(expected) == len(actual) and all(
        is_free_dim(want) or want == have for want, have in zip(expected[1:], actual[1:])
    )
    if not fits:
        raise PtqauditError(
            f"model expects input {format_shape(expected)} "
            f"but dataset {dataset.name} gives {format_shape(['N', *actual[1:]])}"
        )


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ptqaudit, or ~/.cache/ptqaudit when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ptqaudit"


def cifar10_search_dirs(root: str | None) -> list[Path]:
    """Where cifar10 is looked for, in order: --data-root, $PTQAUDIT_DATA, the cache folder.

    Each place may be the folder holding `cifar-10-batches-py` or that folder itself.
    """
    return [place for _, place in _cifar10_search_places(root)]


# --- dispatch and shared steps ------------------------------------------------------


def _load_raw(config: DataConfig) -> _RawData:
    # The built-in names win over a same-named path; pass ./digits to load a local folder.
    if config.name == "digits":
        return _load_digits(config.split)
    if config.name == "cifar10":
        return _load_cifar10(_locate_cifar10(config.root, config.download), config.split)
    path = Path(config.name).expanduser()
    if path.is_dir():
        return _load_image_folder(path, config.split)
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path, config.split)
    problem = "is not a folder or a .npz file" if path.exists() else "is not a known dataset or an existing path"
    raise PtqauditError(
        f"dataset {config.name!r} {problem}: expected digits, cifar10, sst2, "
        "the path of an image folder (one sub-folder per class), of a .npz file, or of a .tsv, .csv or .jsonl text file"
    )


def _check_labels(raw: _RawData) -> None:
    low, high = int(raw.labels.min()), int(raw.labels.max())
    if low < 0 or high >= len(raw.classes):
        raise PtqauditError(
            f"dataset {raw.name} has labels {low}..{high} but {len(raw.classes)} classes: "
            f"labels must lie in 0..{len(raw.classes) - 1}"
        )


def _balanced_subset(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of `limit` examples taken round-robin over classes, in original order.

    The k-th example of every class comes before the (k+1)-th of any class, classes in
    index order (exhausted classes are skipped); the result is sorted so order is stable.
    """
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    class_starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - class_starts  # position within its own class
    order = np.lexsort((labels, rank))  # by rank first, then by class
    return np.sort(order[:limit])


def _normalisation(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int, name: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel mean and std shaped (1, C, 1, 1) float32, None when neither is given.

    Either may be given alone: a missing mean is 0, a missing std is 1.
    """
    if mean is None and std is None:
        return None
    mean_values = _channel_values(mean, "mean", channels, name, default=0.0)
    std_values = _channel_values(std, "std", channels, name, default=1.0)
    if (std_values <= 0).any():
        smallest = np.finfo(np.float32).smallest_subnormal
        raise PtqauditError(f"--std values must be > 0 (at least {smallest:.2g} in float32), got {list(std)}")
    return mean_values.reshape(1, channels, 1, 1), std_values.reshape(1, channels, 1, 1)


def _channel_values(
    values: Sequence[float] | None, option: str, channels: int, name: str, default: float
) -> np.ndarray:
    if values is None:
        return np.full(channels, default, dtype=np.float32)
    array = np.asarray(values, dtype=np.float64).ravel()
    if len(array) not in (1, channels):
        raise PtqauditError(
            f"--{option} has {len(array)} values but dataset {name} has {channels} channel(s): "
            f"give {channels} values, or 1 for all channels"
        )
    with np.errstate(over="ignore"):
        as_float32 = array.astype(np.float32)
    if not np.isfinite(as_float32).all():
        raise PtqauditError(
            f"--{option} values must be finite float32 numbers (magnitude up to {FLOAT32_MAX:.3g}), got {list(values)}"
        )
    return np.broadcast_to(as_float32, (channels,)).copy()


def _to_unit_float32(pixels: np.ndarray, scale: float | None) -> np.ndarray:
    """A C-contiguous float32 copy of `pixels` / `scale`, converted chunk by chunk."""
    out = np.empty(pixels.shape, dtype=np.float32)
    for start in range(0, len(pixels), _CONVERT_CHUNK):
        chunk = slice(start, start + _CONVERT_CHUNK)
        if scale is None:
            out[chunk] = pixels[chunk]
        else:
            np.divide(pixels[chunk], np.float32(scale), out=out[chunk], dtype=np.float32)
    return out


def _all_finite(x: np.ndarray) -> bool:
    """np.isfinite(x).all(), a chunk of examples at a time (no full-size temporary)."""
    return all(np.isfinite(x[start : start + _CONVERT_CHUNK]).all() for start in range(0, len(x), _CONVERT_CHUNK))


def is_free_dim(dim: int | str | None) -> bool:
    # ONNX leaves unknown dimensions as names or None; some exporters write 0 or -1.
    return not isinstance(dim, (int, np.integer)) or dim <= 0


def format_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join(format_dim(dim) for dim in shape) + "]"


def format_dim(dim: int | str | None) -> str:
    return "?" if dim is None else str(dim)


# --- digits ---------------------------------------------------------------------------


def _load_digits(split: str) -> _RawData:
    """scikit-learn's 1,797 8x8 digits, split exactly as
    train_test_split(X, y, test_size=0.3, stratify=y, random_state=0) does (540 test, 1,257 train),
    in the order it returns them."""
    # Imported here: scikit-learn is slow to import and only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = digits.images.astype(np.uint8)[:, None]  # integer intensities 0..16, C=1
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, labels, test_size=0.3, stratify=labels, random_state=0
    )
    x, y = (x_test, y_test) if split == "test" else (x_train, y_train)
    return _RawData(f"digits/{split}", x, y, [str(d) for d in range(10)], scale=16.0)


# --- cifar10 --------------------------------------------------------------------------


def _cifar10_search_places(root: str | None) -> list[tuple[str, Path]]:
    places = []
    if root:
        places.append(("--data-root", Path(root).expanduser()))
    env_root = os.environ.get("PTQAUDIT_DATA")
    if env_root:
        places.append(("$PTQAUDIT_DATA", Path(env_root).expanduser()))
    places.append(("cache", default_cache_dir()))
    return places


def _find_cifar10_folder(place: Path) -> Path | None:
    """`place`/cifar-10-batches-py, or `place` itself when it is that folder."""
    if (place / CIFAR10_FOLDER).is_dir():
        return place / CIFAR10_FOLDER
    if place.is_dir() and (place.name == CIFAR10_FOLDER or (place / "batches.meta").is_file()):
        return place
    return None


def _locate_cifar10(root: str | None, download: bool) -> Path:
    places = _cifar10_search_places(root)
    for _, place in places:
        folder = _find_cifar10_folder(place)
        if folder is not None:
            return folder
    if not download:
        looked = ", ".join(f"{label} {place}" for label, place in places)
        raise PtqauditError(
            f"CIFAR-10 not found: no {CIFAR10_FOLDER} folder in {looked}; "
            "provide it with --data-root DIR, $PTQAUDIT_DATA=DIR, or --download"
        )
    return _download_cifar10(Path(root).expanduser() if root else default_cache_dir())


def _load_cifar10(folder: Path, split: str) -> _RawData:
    meta_path = folder / "batches.meta"
    names = _read_cifar10_pickle(folder, "batches.meta", split).get("label_names")
    if not (isinstance(names, list) and names and all(isinstance(name, str) for name in names)):
        raise PtqauditError(f"{meta_path} is not CIFAR-10 metadata: expected 'label_names', a list of class names")
    pixel_batches, label_batches = [], []
    for file_name in CIFAR10_SPLIT_FILES[split]:
        path = folder / file_name
        batch = _read_cifar10_pickle(folder, file_name, split)
        data, labels = batch.get("data"), _cifar10_labels(batch.get("labels"), path)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32 and len(labels) == len(data)):
            found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise PtqauditError(
                f"{path} is not a CIFAR-10 batch: expected 'data' uint8 (N, 3072) "
                f"and N 'labels', got data {found} and {len(labels)} labels"
            )
        pixel_batches.append(data.reshape(-1, 3, 32, 32))  # rows are channel-major: R, G, B planes
        label_batches.append(labels)
    pixels = np.concatenate(pixel_batches)
    return _RawData(f"cifar10/{split}", pixels, np.concatenate(label_batches), names, scale=255.0)


def _cifar10_labels(labels: object, path: Path) -> np.ndarray:
    """A batch's 'labels' (a list of ints, or a 1-D integer array) as int64."""
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    # bool is an int subclass but never a label; type() also keeps out int subclasses
    if isinstance(labels, list) and all(type(label) is int for label in labels):
        try:
            return np.array(labels, dtype=np.int64)
        except OverflowError:
            pass
    raise PtqauditError(f"{path} is not a CIFAR-10 batch: expected 'labels', a list of class indices 0..9")


def _read_cifar10_pickle(folder: Path, file_name: str, split: str) -> dict:
    """One CIFAR-10 file (a pickled dict) read by `_CifarUnpickler`, its NumPy arrays rebuilt."""
    path = folder / file_name
    if not path.is_file():
        needed = ", ".join(("batches.meta", *CIFAR10_SPLIT_FILES[split]))
        raise PtqauditError(f"CIFAR-10 folder {folder} lacks {file_name} (the {split} split needs {needed})")
    try:
        with open(path, "rb") as file:
            # The official batches are Python 2 pickles; latin1 keeps their byte strings intact.
            content = _CifarUnpickler(file, encoding="latin1").load()
        if isinstance(content, dict):
            content = {key: value.to_array() if isinstance(value, _PickledArray) else value
                       for key, value in content.items()}
    except _RefusedPickle as error:
        raise PtqauditError(
            f"refusing CIFAR-10 file {path}: {error}; only dicts, lists, strings, numbers and NumPy arrays are read "
            "(the file may have been made to run code when unpickled)"
        ) from error
    except Exception as error:  # a damaged pickle can raise almost any exception type
        raise PtqauditError(f"cannot read CIFAR-10 file {path}: {str(error) or type(error).__name__}") from error
    if not isinstance(content, dict):
        raise PtqauditError(f"{path} is not a CIFAR-10 file: expected a pickled dict")
    return content


class _RefusedPickle(pickle.UnpicklingError):
    """Something a CIFAR-10 file never holds; the unpickler stops before using it."""


class _PickledDtype:
    """numpy.dtype(spec, align, copy) and its state as a pickle holds them, kept as plain data
    until `to_dtype` checks them: NumPy itself never sees a hostile state."""

    __slots__ = ("spec", "byteorder")

    def __init__(self, spec: object, align: object = False, copy: object = True):
        self.spec, self.byteorder = spec, "="

    def set_state(self, state: object) -> None:
        # (version, byteorder, subarray, names, fields, ...): a plain number type has no subarray or fields
        if not (isinstance(state, tuple) and len(state) >= 5 and state[2:5] == (None, None, None)):
            raise _RefusedPickle("it holds a NumPy dtype that is not a plain number type")
        self.byteorder = state[1]

    def to_dtype(self) -> np.dtype:
        spec = self.spec.decode("latin1") if isinstance(self.spec, bytes) else self.spec
        plain = isinstance(spec, str) and re.fullmatch(r"[biuf][0-9]{1,2}", spec)  # bool, ints, floats
        if not (plain and self.byteorder in ("<", ">", "=", "|")):
            raise _RefusedPickle(f"it holds a NumPy dtype {_brief(spec)}, not a plain number type")
        return np.dtype(spec).newbyteorder(self.byteorder)


class _PickledArray:
    """A pickled ndarray kept as plain data: numpy's _reconstruct(ndarray, (0,), b'b') followed by
    the state (version, shape, dtype, Fortran order, raw bytes), or (protocol 5) _frombuffer(raw,
    dtype, shape, order). `to_array` views the raw bytes, so memory is bounded by the file's size."""

    __slots__ = ("shape", "dtype", "fortran", "raw")

    def __init__(self):
        self.shape = self.dtype = self.fortran = self.raw = None

    def set_state(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _RefusedPickle("it holds a NumPy array state of an unknown form")
        _, self.shape, self.dtype, self.fortran, self.raw = state

    def to_array(self) -> np.ndarray:
        if not isinstance(self.dtype, _PickledDtype):
            raise _RefusedPickle("it holds a NumPy array without a dtype")
        dtype = self.dtype.to_dtype()
        raw = self.raw.encode("latin1") if isinstance(self.raw, str) else self.raw  # Python 2 str
        shape = self.shape
        if not (isinstance(raw, (bytes, bytearray)) and isinstance(shape, tuple)
                and all(type(size) is int and size >= 0 for size in shape)):
            raise _RefusedPickle("it holds a NumPy array state of an unknown form")
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise _RefusedPickle(f"it holds a NumPy array of shape {shape} with {len(raw):,} bytes of data")
        return np.frombuffer(raw, dtype).reshape(shape, order="F" if self.fortran else "C")


def _reconstruct_array(subtype: object, shape: object, typecode: object) -> _PickledArray:
    """numpy's _reconstruct: an empty array whose state (shape, data) the pickle's BUILD gives."""
    if subtype is not _NDARRAY:
        raise _RefusedPickle("it rebuilds a NumPy array of a subclass")
    return _PickledArray()


def _array_from_buffer(raw: object, dtype: object, shape: object, order: object) -> _PickledArray:
    """numpy's _frombuffer, which protocol-5 pickles call with the array's bytes."""
    array = _PickledArray()
    array.set_state((1, shape, dtype, order == "F", raw))
    return array


def _latin1_encode(text: object, encoding: object) -> bytes:
    """codecs.encode as Python 3 writes bytes into protocol-2 pickles: always latin1."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise _RefusedPickle(f"it calls _codecs.encode with encoding {_brief(encoding)}")
    return text.encode("latin1")


_NDARRAY = object()  # numpy.ndarray as a pickle names it: only ever an argument of _reconstruct
# The globals a CIFAR-10 file names (NumPy 1 and 2 spell its modules differently).
_CIFAR_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _PickledDtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
    ("_codecs", "encode"): _latin1_encode,
}
# What a memo reference may not repeat: a real batch never shares these, and sharing is how a few
# hundred bytes unfold into billions of elements (nested tuples hashed as dict keys, lists printed).
_UNSHAREABLE = (list, dict, tuple, _PickledArray)
# Dict keys are hashed as they are read; a tuple nested a million deep would crash the hash.
_KEY_TYPES = (str, bytes, int)


def _brief(value: object) -> str:
    """A short text for a value read from a file, to quote in a message."""
    return repr(value)[:60] if isinstance(value, (str, bytes)) else f"a {type(value).__name__}"


def _refused(opcode: bytes, what: str):
    """An opcode a CIFAR-10 batch never holds."""

    def load(unpickler: pickle._Unpickler) -> None:
        raise _RefusedPickle(f"it uses {what} (pickle opcode {opcode!r}), which a CIFAR-10 batch never holds")

    return load


def _unshared(load_memo_reference):
    """A memo-reference opcode (GET, BINGET, LONG_BINGET) that refuses to repeat a container."""

    def load(unpickler: pickle._Unpickler) -> None:
        load_memo_reference(unpickler)
        if isinstance(unpickler.stack[-1], _UNSHAREABLE):
            raise _RefusedPickle(f"it refers twice to one {type(unpickler.stack[-1]).__name__}")

    return load


def _plain_keys(load_dict_items, keys_on_stack):
    """SETITEM or SETITEMS, refusing a dict key that is not a string or a number before hashing it."""

    def load(unpickler: pickle._Unpickler) -> None:
        for key in keys_on_stack(unpickler.stack):
            if not isinstance(key, _KEY_TYPES):
                raise _RefusedPickle(f"it holds a dict whose key is {_brief(key)}")
        load_dict_items(unpickler)

    return load


class _CifarUnpickler(pickle._Unpickler):
    """An unpickler for CIFAR-10 files that runs no code and allocates no more than the file holds.

    Only the globals in _CIFAR_PICKLE_GLOBALS resolve, each to a stand-in that records data; BUILD
    fills in only those stand-ins; a memo reference never repeats a container; dict keys are strings
    or numbers; DUP, sets and copyreg extension codes (never written for a batch) are refused. It is
    the pure-Python unpickler because only its opcode table can be narrowed like this.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _CIFAR_PICKLE_GLOBALS[module, name]
        except KeyError:
            raise _RefusedPickle(f"it asks for the global {module[:100]}.{name[:100]}") from None

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, (_PickledArray, _PickledDtype)):
            raise _RefusedPickle(f"it sets the state of a {type(target).__name__}")
        target.set_state(state)


def _cifar_opcode_table() -> dict:
    """The pure-Python unpickler's opcode table, narrowed to what a CIFAR-10 batch needs."""
    table = dict(pickle._Unpickler.dispatch)
    table[pickle.BUILD[0]] = _CifarUnpickler.load_build
    table[pickle.SETITEM[0]] = _plain_keys(table[pickle.SETITEM[0]], lambda stack: stack[-2:-1])
    table[pickle.SETITEMS[0]] = _plain_keys(table[pickle.SETITEMS[0]], lambda stack: stack[0::2])  # after a MARK
    for opcode in (pickle.GET, pickle.BINGET, pickle.LONG_BINGET):
        table[opcode[0]] = _unshared(table[opcode[0]])
    for opcode, what in ((pickle.DUP, "a duplicated object"), (pickle.EMPTY_SET, "a set"), (pickle.FROZENSET, "a set"),
                         (pickle.EXT1, "an extension code"), (pickle.EXT2, "an extension code"),
                         (pickle.EXT4, "an extension code")):
        table[opcode[0]] = _refused(opcode, what)
    return table


_CifarUnpickler.dispatch = _cifar_opcode_table()


def _download_cifar10(base: Path) -> Path:
    """Fetch, verify and extract the official archive into `base`; return the batches folder."""
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PtqauditError(f"cannot create {base} for the CIFAR-10 download: {error}") from error
    archive = base / CIFAR10_ARCHIVE
    # A verified archive left by an earlier run (e.g. interrupted extraction) is reused.
    if not (archive.is_file() and _md5(archive) == CIFAR10_MD5):
        _fetch_verified(CIFAR10_URL, archive, CIFAR10_MD5)
    return _extract_cifar10(archive, base)


def _fetch_verified(url: str, destination: Path, md5: str) -> None:
    """Download to a temporary file beside `destination`, check its MD5, then rename it."""
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    except OSError as error:
        raise PtqauditError(f"cannot write the download into {destination.parent}: {error}") from error
    os.close(handle)
    temp_path = Path(temp_name)
    try:
        _fetch(url, temp_path)
        actual = _md5(temp_path)
        if actual != md5:
            raise PtqauditError(
                f"download of {url} failed its checksum (MD5 {actual}, expected {md5}); "
                "retry, or download and extract it yourself and pass --data-root"
            )
        os.replace(temp_path, destination)
    finally:
        temp_path.unlink(missing_ok=True)


def _fetch(url: str, destination: Path) -> None:
    """Write the bytes at `url` into `destination`, showing progress."""
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(destination, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with Progress(total, f"downloading {url.rsplit('/', 1)[-1]}", "B", unit_scale=True) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError and timeouts are OSErrors
        reason = getattr(error, "reason", error)
        raise PtqauditError(
            f"could not download {url}: {reason}; check the network, "
            "or download and extract it yourself and pass --data-root"
        ) from error


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # an integrity check against the published sum
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _extract_cifar10(archive: Path, base: Path) -> Path:
    """Extract into a temporary folder in `base`, then rename the batches folder into place."""
    destination = base / CIFAR10_FOLDER
    temp_dir = Path(tempfile.mkdtemp(prefix=".cifar-10-extract-", dir=base))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_tar_member(member, archive)
                tar.extractall(temp_dir, members=members, **_TAR_FILTER)
        except (tarfile.TarError, OSError, EOFError) as error:
            raise PtqauditError(f"cannot extract {archive}: {error}") from error
        extracted = temp_dir / CIFAR10_FOLDER
        if not (extracted / "batches.meta").is_file():
            raise PtqauditError(f"{archive} does not contain {CIFAR10_FOLDER}/batches.meta")
        try:
            os.rename(extracted, destination)
        except OSError as error:
            # Another process may have finished the same download first; its copy is as good.
            if not (destination / "batches.meta").is_file():
                raise PtqauditError(f"cannot move the extracted CIFAR-10 into {destination}: {error}") from error
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return destination


def _check_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse members that could land outside the extraction folder (or are not plain files)."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
        raise PtqauditError(f"refusing to extract {archive}: unsafe member {member.name!r}")


# --- image folder ---------------------------------------------------------------------


def _load_image_folder(folder: Path, split: str) -> _RawData:
    """One sub-folder per class (sorted names = class indices) holding PNG/JPEG files.

    With train/ and test/ sub-folders, the one named by `split` is used. Images are not
    resized: all must share one size. C=1 when every image is grayscale, else RGB.
    """
    name = folder.resolve().name
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        folder, name = folder / split, f"{name}/{split}"
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise PtqauditError(
            f"image folder {folder} has no class sub-folders: expected {folder}/<class>/<image>.png|.jpg|.jpeg"
        )
    files: list[Path] = []
    labels: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise PtqauditError(f"class folder {class_dir} has no .png, .jpg or .jpeg images")
        files += images
        labels += [index] * len(images)

    # Headers first (cheap), so a size mismatch is reported before decoding anything.
    headers = [_image_header(path) for path in files]
    first_mode, first_size = headers[0]
    for path, (_, size) in zip(files, headers):
        if size != first_size:
            raise PtqauditError(
                f"images differ in size: {files[0]} is {_format_size(first_size)} but {path} is "
                f"{_format_size(size)}; resize them to one size first (ptqaudit does not resize)"
            )
    mode = "L" if all(image_mode in GRAYSCALE_MODES for image_mode, _ in headers) else "RGB"
    width, height = first_size
    pixels = np.empty((len(files), 1 if mode == "L" else 3, height, width), dtype=np.uint8)
    for i, path in enumerate(track(files, f"loading {name}", "img")):
        pixels[i] = _decode_image(path, mode)
    return _RawData(name, pixels, np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs], scale=255.0)


# Pillow reports damaged files through several exception types, depending on the format.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _image_header(path: Path) -> tuple[str, tuple[int, int]]:
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except _IMAGE_ERRORS as error:
        raise PtqauditError(f"cannot read image {path}: {error}") from error


def _decode_image(path: Path, mode: str) -> np.ndarray:
    """Pixels of one image as uint8 CHW in `mode` ("L" or "RGB")."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode))
    except _IMAGE_ERRORS as error:
        raise PtqauditError(f"cannot read image {path}: {error}") from error
    return array[None] if mode == "L" else array.transpose(2, 0, 1)


def _format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} (WxH)"


# --- .npz -----------------------------------------------------------------------------


def _load_npz(path: Path, split: str) -> _RawData:
    """Arrays x and y, or x_<split> and y_<split>; optional `classes` (strings).

    x: uint8 (divided by 255) or float (used as is, e.g. already normalised), shaped
    (N, C, H, W), (N, H, W, C) with C 1 or 3, or (N, H, W). y: N integers, or (N, 1).
    """
    split_keys = (f"x_{split}", f"y_{split}")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise PtqauditError(f"{path} holds a single array, not an .npz archive with x and y arrays")
        with archive:
            keys = set(archive.files)
            x_key, y_key = split_keys if set(split_keys) <= keys else ("x", "y")
            if not {x_key, y_key} <= keys:
                raise PtqauditError(
                    f"{path} has arrays {sorted(keys)}: expected x and y, "
                    f"or {split_keys[0]} and {split_keys[1]} for the {split} split"
                )
            _check_npz_sizes(archive, x_key, y_key, path)
            x, y = archive[x_key], archive[y_key]
            classes = archive["classes"] if "classes" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as error:
        # NotImplementedError: a zip member compressed by a method zipfile lacks
        raise PtqauditError(f"cannot read {path}: {error}") from error

    label = f"{path.name}/{split}" if x_key == split_keys[0] else path.name
    x = _npz_pixels_nchw(x, x_key, path)
    y = _npz_labels(y, y_key, path)
    if len(x) != len(y):
        raise PtqauditError(f"{path}: {x_key} has {len(x)} examples but {y_key} has {len(y)} labels")
    if len(y) == 0:
        raise PtqauditError(f"{path}: {x_key} holds no examples")
    if x.dtype == np.uint8:
        scale = 255.0
    elif np.issubdtype(x.dtype, np.floating):
        scale = None  # load_dataset checks that they are finite as float32
    else:
        raise PtqauditError(f"{path}: {x_key} has dtype {x.dtype}: expected uint8 (0..255) or float")
    return _RawData(label, x, y, _npz_classes(classes, y, y_key, path), scale)


def _is_token_npz(name: str) -> bool:
    """Whether a .npz holds tokenized text: y and integer arrays [examples, sequence] named as model inputs."""
    path = Path(name).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".npz"):
        return False
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            inputs = keys - {"y", "classes"}
            if "y" not in keys or not inputs or any(k == "x" or k.startswith("x_") for k in keys):
                return False  # x (or x_<split>) holds images
            declared = [_npz_declared(archive, key, path) for key in inputs]
    except Exception:  # unreadable: the image loader reports it in its words
        return False
    return all(len(shape) == 2 and np.issubdtype(dtype, np.integer) for shape, dtype in declared)


def _load_npz_tokens(path: Path, split: str) -> tuple[TextInputs, np.ndarray, list[str]]:
    """Tokenized text in a .npz (text_data.load_token_npz), its headers checked before anything is allocated."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            declared = [_npz_declared(archive, key, path) for key in sorted(keys)]
            needed = sum(math.prod(shape) * max(dtype.itemsize, 8) for shape, dtype in declared)
            memory = _physical_memory()
            if memory is not None and needed > memory:
                raise PtqauditError(f"{path}: loading its arrays needs about {needed / 2**30:,.1f} GiB of memory, more "
                                    f"than this machine's {memory / 2**30:,.1f} GiB")
            inputs, y = load_token_npz(path, archive, keys, split)
            classes = archive["classes"] if "classes" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as error:
        raise PtqauditError(f"cannot read {path}: {error}") from error
    y = _npz_labels(y, "y", path)
    if len(y) != len(inputs):
        raise PtqauditError(f"{path}: the input arrays hold {len(inputs)} examples but y has {len(y)} labels")
    return inputs, y, _npz_classes(classes, y, "y", path)


def _check_npz_sizes(archive: np.lib.npyio.NpzFile, x_key: str, y_key: str, path: Path) -> None:
    """Check what the arrays' headers declare against the archive and this machine's memory, before
    NumPy allocates them: a header of a few bytes can claim 10^11 examples."""
    members = [x_key, y_key] + (["classes"] if "classes" in archive.files else [])
    declared = {key: _npz_declared(archive, key, path) for key in members}
    x_shape, x_dtype = declared[x_key]
    # the arrays as stored, plus the float32 pixels and int64 labels load_dataset makes of them
    needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in declared.values())
    needed += math.prod(x_shape) * 4 + math.prod(declared[y_key][0]) * 8
    memory = _physical_memory()
    if memory is not None and needed > memory:
        raise PtqauditError(
            f"{path}: {x_key} is {x_dtype} of shape {x_shape}; loading it needs about {needed / 2**30:,.1f} GiB "
            f"of memory, more than this machine's {memory / 2**30:,.1f} GiB"
        )


def _npz_declared(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype in a member's .npy header, refused when its data would not fit in the member."""
    try:
        info = archive.zip.getinfo(f"{key}.npy")
    except KeyError:
        raise PtqauditError(f"{path}: {key} is not a .npy array") from None
    with archive.zip.open(info) as member:
        version = np.lib.format.read_magic(member)
        # version 3.0 differs from 2.0 only in the header's text encoding (UTF-8)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
    if dtype.hasobject:
        raise PtqauditError(f"{path}: {key} holds Python objects (dtype {dtype}): expected an array of numbers")
    data_bytes = math.prod(shape) * dtype.itemsize
    if data_bytes > info.file_size:
        raise PtqauditError(
            f"{path}: {key} declares shape {shape} of {dtype} ({data_bytes:,} bytes) "
            f"but its archive member holds only {info.file_size:,} bytes"
        )
    return shape, dtype


def _physical_memory() -> int | None:
    """This machine's memory in bytes; None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _npz_pixels_nchw(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    # Channels-last only when the last axis looks like channels and the second does not.
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    if x.ndim == 4:
        return x
    raise PtqauditError(
        f"{path}: {key} has shape {x.shape}: expected (N, C, H, W), (N, H, W, C) with C 1 or 3, or (N, H, W)"
    )


def _npz_labels(y: np.ndarray, key: str, path: Path) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # Keras-style (N, 1) labels
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise PtqauditError(f"{path}: {key} has shape {y.shape} and dtype {y.dtype}: expected N integer labels")
    if len(y) and y.min() < 0:
        raise PtqauditError(f"{path}: {key} has negative labels: expected class indices 0..K-1")
    return y.astype(np.int64)


def _npz_classes(classes: np.ndarray | None, y: np.ndarray, y_key: str, path: Path) -> list[str]:
    if classes is None:
        high = int(y.max())
        if high >= MAX_UNNAMED_CLASSES:
            raise PtqauditError(
                f"{path}: {y_key} has labels up to {high:,}, so {high + 1:,} classes; without a classes array at most "
                f"{MAX_UNNAMED_CLASSES:,} are accepted: add a classes array naming each class"
            )
        return [str(index) for index in range(high + 1)]
    if classes.ndim != 1 or classes.dtype.kind not in "US":
        raise PtqauditError(f"{path}: classes has shape {classes.shape} and dtype {classes.dtype}: expected strings")
    return [name.decode() if isinstance(name, bytes) else str(name) for name in classes.tolist()]
