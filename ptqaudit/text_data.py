"""Text datasets for text classifiers: GLUE's SST-2 folder, .tsv/.csv/.jsonl files tokenized with a Hugging Face
`tokenizer.json`, and .npz archives of already tokenized inputs, all as `TextInputs` keyed by model input name.

Padding is part of the deployment scenario (padded positions enter the activation ranges dynamic quantization
measures), so it is a setting: "longest" pads each batch to its longest sequence, as Hugging Face pipelines do;
"max-length" pads every sequence to --max-length, as fixed-shape deployments do.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PtqauditError

PADDINGS = ("longest", "max-length")
DEFAULT_MAX_LENGTH = 128
TEXT_SUFFIXES = (".tsv", ".csv", ".jsonl")
TEXT_COLUMNS = ("sentence", "text")  # what --text-column defaults to, the first a file has
SST2_SPLIT_FILES = {"test": "dev.tsv", "train": "train.tsv"}  # GLUE's test split has no labels: dev is evaluated
PAD_TOKENS = ("[PAD]", "<pad>")  # BERT's and RoBERTa's padding tokens, when the tokenizer file configures none
MAX_TEXT_BYTES = 2**31  # a text file is read whole: refuse what could not be tokenized in memory anyway
TOKENIZE_CHUNK = 4096  # sentences per encode_batch call, so progress can be shown between chunks
INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS = "input_ids", "attention_mask", "token_type_ids"


@dataclass
class TextInputs:
    """Tokenized examples: one int64 array [N, L] per model input, padded to a common L; `lengths` are the
    real tokens of each example; `texts` the sentences they came from (None for pre-tokenized data).
    Indexing (a slice or an index array) selects examples, as with an image array."""

    arrays: dict[str, np.ndarray]
    lengths: np.ndarray
    padding: str  # one of PADDINGS
    texts: list[str] | None = None
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index) -> "TextInputs":
        texts = None
        if self.texts is not None:
            picked = range(len(self.texts))[index] if isinstance(index, slice) else np.asarray(index).reshape(-1)
            texts = [self.texts[i] for i in picked]
        return TextInputs({name: array[index] for name, array in self.arrays.items()}, self.lengths[index],
                          self.padding, texts, self.pad_id)

    @property
    def shape(self) -> tuple[int, int]:
        """(examples, padded sequence length), like an image array's shape."""
        return next(iter(self.arrays.values())).shape

    @property
    def sequence_length(self) -> int:
        """The length every example is padded to in storage: what a fixed-shape deployment feeds, and what
        layer shapes and MACs are counted at."""
        return self.shape[1]

    def trimmed(self) -> "TextInputs":
        """These examples as one batch is fed: with "longest" padding, cut to the longest sequence among them."""
        if self.padding != "longest" or not len(self):
            return self
        longest = max(1, int(self.lengths.max()))
        if longest == self.sequence_length:
            return self
        return TextInputs({name: array[:, :longest] for name, array in self.arrays.items()}, self.lengths,
                          self.padding, self.texts, self.pad_id)

    def with_padding(self, padding: str, max_length: int) -> "TextInputs":
        """The same sentences under another padding scenario: "max-length" pads every one to max_length."""
        width = max_length if padding == "max-length" else max(1, int(self.lengths.max(initial=1)))
        arrays = {}
        for name, array in self.arrays.items():
            fill = self.pad_id if name == INPUT_IDS else 0
            resized = np.full((len(array), width), fill, dtype=array.dtype)
            keep = min(width, array.shape[1])
            resized[:, :keep] = array[:, :keep]
            arrays[name] = resized
        return TextInputs(arrays, self.lengths, padding, self.texts, self.pad_id)

    def digest_arrays(self) -> list[np.ndarray]:
        """The arrays that identify these inputs, in a fixed order (for a run's data fingerprint)."""
        return [self.arrays[name] for name in sorted(self.arrays)] + [self.lengths]


@dataclass(frozen=True)
class TextConfig:
    """How text becomes model inputs."""

    tokenizer: str | None = None  # a Hugging Face tokenizer.json
    max_length: int = DEFAULT_MAX_LENGTH
    padding: str = "longest"
    text_column: str | None = None  # None: the first of TEXT_COLUMNS the file has
    label_column: str = "label"


def is_text_source(name: str) -> bool:
    return name == "sst2" or Path(name).suffix.lower() in TEXT_SUFFIXES


def load_sst2(root: str | None, split: str, text: TextConfig) -> tuple[TextInputs, np.ndarray, str]:
    """GLUE's SST-2 folder (train.tsv, dev.tsv; or the folder holding SST-2/): the test split is dev.tsv."""
    if root is None:
        raise PtqauditError("--data sst2 needs --data-root DIR, the GLUE SST-2 folder holding train.tsv and dev.tsv")
    base = Path(root).expanduser()
    folder = next((f for f in (base, base / "SST-2") if (f / SST2_SPLIT_FILES[split]).is_file()), None)
    if folder is None:
        raise PtqauditError(f"--data-root {root}: no {SST2_SPLIT_FILES[split]} there or in {base / 'SST-2'} "
                            "(GLUE's SST-2 folder holds train.tsv and dev.tsv)")
    texts, labels = _read_table(folder / SST2_SPLIT_FILES[split], "sentence", "label")
    return tokenize(texts, text), labels, f"sst2/{split}"


def load_text_file(path: Path, split: str, text: TextConfig) -> tuple[TextInputs, np.ndarray, str]:
    """A .tsv, .csv or .jsonl file of sentences and integer labels (one split: the file is the data)."""
    if split != "test":
        raise PtqauditError(f"--split {split}: {path} holds one split; give the file of that split as --data")
    texts, labels = _read_table(path, text.text_column, text.label_column)
    return tokenize(texts, text), labels, path.name


def load_token_npz(path: Path, archive, keys: set[str], split: str) -> tuple[TextInputs, np.ndarray]:
    """Pre-tokenized inputs: one integer array [N, L] per model input, named as the input, plus y. The real
    length of each example is its attention_mask's sum where there is one (else every position is real)."""
    if split != "test":
        raise PtqauditError(f"--split {split}: {path} holds one split (arrays named as the model's inputs, and y)")
    names = sorted(keys - {"y", "classes"})
    arrays = {}
    for name in names:
        array = archive[name]
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise PtqauditError(f"{path}: {name} has shape {array.shape} and dtype {array.dtype}: expected integer "
                                "token arrays [examples, sequence], one per model input, named as the input")
        arrays[name] = array.astype(np.int64)
    shapes = {name: array.shape for name, array in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise PtqauditError(f"{path}: the input arrays differ in shape: {shapes}")
    mask = arrays.get(ATTENTION_MASK)
    lengths = mask.sum(axis=1) if mask is not None else np.full(len(arrays[names[0]]), arrays[names[0]].shape[1])
    return TextInputs(arrays, lengths.astype(np.int64), "max-length"), archive["y"]


def tokenize(texts: list[str], text: TextConfig) -> TextInputs:
    """input_ids, attention_mask and token_type_ids of each sentence, by the tokenizer file, truncated to
    --max-length and padded (in storage) to the longest sequence, or to --max-length with "max-length" padding."""
    if text.tokenizer is None:
        raise PtqauditError("text data needs --tokenizer FILE, the model's Hugging Face tokenizer.json")
    if text.padding not in PADDINGS:
        raise PtqauditError(f"--padding {text.padding!r}: expected one of {', '.join(PADDINGS)}")
    if text.max_length < 1:
        raise PtqauditError(f"--max-length must be at least 1, got {text.max_length}")
    tokenizer = load_tokenizer(text.tokenizer)
    tokenizer.no_padding()  # padding is ours to apply: it is part of the scenario
    tokenizer.enable_truncation(text.max_length)
    pad_id = _pad_id(tokenizer)
    from .progress import track

    encodings = []
    chunks = range(0, len(texts), TOKENIZE_CHUNK)
    for start in track(chunks, "tokenize", "chunk", total=len(chunks)):
        encodings += tokenizer.encode_batch(texts[start:start + TOKENIZE_CHUNK])
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    width = text.max_length if text.padding == "max-length" else max(1, int(lengths.max(initial=1)))
    arrays = {name: np.zeros((len(texts), width), dtype=np.int64) for name in (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)}
    arrays[INPUT_IDS].fill(pad_id)
    for row, encoding in enumerate(encodings):
        n = len(encoding.ids)
        arrays[INPUT_IDS][row, :n] = encoding.ids
        arrays[ATTENTION_MASK][row, :n] = encoding.attention_mask
        arrays[TOKEN_TYPE_IDS][row, :n] = encoding.type_ids
    return TextInputs(arrays, lengths, text.padding, list(texts), pad_id)


def load_tokenizer(path: str):
    """A Hugging Face tokenizers file, read by the `tokenizers` library (JSON: no code runs)."""
    from tokenizers import Tokenizer

    file = Path(path).expanduser()
    if not file.is_file():
        raise PtqauditError(f"--tokenizer {path}: no such file (expected a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises its own Exception subclass for a malformed file
        raise PtqauditError(f"--tokenizer {path} is not a readable tokenizer.json: {str(exc).splitlines()[0]}") from exc


def _pad_id(tokenizer) -> int:
    configured = tokenizer.padding
    if configured:
        return int(configured["pad_id"])
    return next((tokenizer.token_to_id(t) for t in PAD_TOKENS if tokenizer.token_to_id(t) is not None), 0)


def _read_table(path: Path, text_column: str | None, label_column: str) -> tuple[list[str], np.ndarray]:
    """(sentences, int64 labels) from a .tsv, .csv or .jsonl file, by column name."""
    if not path.is_file():
        raise PtqauditError(f"text data {path}: no such file")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise PtqauditError(f"text data {path} is {path.stat().st_size:,} bytes; at most {MAX_TEXT_BYTES:,} are read")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PtqauditError(f"text data {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    rows = _jsonl_rows(content, path) if path.suffix.lower() == ".jsonl" else _delimited_rows(content, path)
    if not rows:
        raise PtqauditError(f"text data {path} holds no examples")
    columns = list(rows[0])
    text_column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    for role, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column is None or column not in columns:
            wanted = column or " or ".join(TEXT_COLUMNS)
            raise PtqauditError(f"text data {path} has no column {wanted} (for {role}); its columns: {', '.join(columns)}")
    texts, labels = [], []
    for number, row in enumerate(rows, start=2 if path.suffix.lower() != ".jsonl" else 1):
        sentence, label = row.get(text_column), row.get(label_column)
        if not isinstance(sentence, str):
            raise PtqauditError(f"text data {path}, row {number}: {text_column} is {sentence!r}, not text")
        labels.append(_label(label, path, number, label_column))
        texts.append(sentence)
    return texts, np.array(labels, dtype=np.int64)


def _label(value, path: Path, row: int, column: str) -> int:
    try:
        label = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        label = None
    if label is None or label < 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise PtqauditError(f"text data {path}, row {row}: {column} is {str(value)[:40]!r}: expected a class index "
                            "0..K-1 (the model's output order)")
    return label


def _delimited_rows(content: str, path: Path) -> list[dict]:
    """Rows of a .tsv (tab, no quoting, as GLUE writes it) or .csv (comma, quoted fields) file with a header."""
    tsv = path.suffix.lower() == ".tsv"
    reader = csv.DictReader(content.splitlines(), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    rows = list(reader)
    if reader.fieldnames is None:
        raise PtqauditError(f"text data {path} is empty: expected a header row naming its columns")
    bad = next((n for n, row in enumerate(rows, start=2) if None in row or None in row.values()), None)
    if bad is not None:
        raise PtqauditError(f"text data {path}, row {bad}: its number of fields differs from the header's "
                            f"({len(reader.fieldnames)})")
    return rows


def _jsonl_rows(content: str, path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PtqauditError(f"text data {path}, line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise PtqauditError(f"text data {path}, line {number}: expected a JSON object per line")
        rows.append(row)
    return rows


def describe_padding(inputs: TextInputs) -> str:
    """The padding scenario in words, for reports."""
    if inputs.padding == "longest":
        return f"padded per batch to its longest sequence (at most {inputs.sequence_length} tokens)"
    return f"padded to {inputs.sequence_length} tokens"


def feeds(x, inputs: Sequence[tuple[str, np.dtype]]) -> dict[str, np.ndarray]:
    """A batch as a model's named inputs: an image array feeds the one input; TextInputs feed each input its array,
    cast to the input's integer type (int64 or int32)."""
    if not isinstance(x, TextInputs):
        ((name, _),) = inputs
        return {name: x}
    return {name: x.arrays[name].astype(dtype, copy=False) for name, dtype in inputs}


TEXT_PERTURBATIONS = ("typos", "dropped_words", "casing")
# severity 1..5: the share of a sentence's words each perturbation touches
PERTURBATION_RATES = (0.05, 0.10, 0.15, 0.20, 0.30)


def perturb(texts: list[str], kind: str, severity: int, seed: int = 0) -> list[str]:
    """Sentences under a text perturbation at severity 1..5, the counterpart of image corruptions: "typos" edits
    one character of a share of the words (swap, drop, repeat or replace a letter), "dropped_words" removes a
    share of the words (never all), "casing" upper-cases a share of the words (an uncased tokenizer undoes it,
    which the numbers then show)."""
    rate = PERTURBATION_RATES[severity - 1]
    rng = np.random.default_rng([seed, TEXT_PERTURBATIONS.index(kind), severity])
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for text in texts:
        words = text.split(" ")
        touched = rng.random(len(words)) < rate
        if kind == "dropped_words":
            kept = [w for w, t in zip(words, touched) if not t]
            out.append(" ".join(kept or words[:1]))
            continue
        changed = []
        for word, touch in zip(words, touched):
            if touch and kind == "casing":
                word = word.upper()
            elif touch and len(word) > 1:
                i = int(rng.integers(len(word) - 1))
                edit = int(rng.integers(4))
                if edit == 0:
                    word = word[:i] + word[i + 1] + word[i] + word[i + 2:]
                elif edit == 1:
                    word = word[:i] + word[i + 1:]
                elif edit == 2:
                    word = word[:i] + word[i] + word[i:]
                else:
                    word = word[:i] + letters[int(rng.integers(26))] + word[i + 1:]
            changed.append(word)
        out.append(" ".join(changed))
    return out
