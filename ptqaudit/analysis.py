"""Vulnerability analysis of a search run, every accuracy measured on ONNX Runtime: per layer, per input and
class, batch size and batch composition, common corruptions, accuracy versus budget. Stored in analysis.json."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data import DataConfig, Dataset, load_dataset
from .text_data import PADDINGS, TEXT_PERTURBATIONS, describe_padding, feeds, perturb, tokenize
from .distill import DistillSummary
from .errors import PtqauditError
from .evaluate import KernelEngines, make_session
from .kernels import detect_kernel_family, kernel_source
from .onnx_graph import LoadedModel, load_model, with_outputs
from .policy import LayerQuant, ResolvedPolicy, load_policy, mitigations
from .predictions import accuracy, drop_points
from .progress import Progress
from .workers import EvaluationPool, Request, WorkerSettings
from .runs import (ANALYSIS, SEARCH_RUN_FILE, RunFolder, check_fields, check_schema_version, input_identity, read_checked,
                   read_json, typed_from_dict, without_none, write_json)
from .search.run import SearchConfig, SearchSummary
from .search.space import OBJECTIVES, Objective

ANALYSIS_FILE = "analysis.json"
ANALYSIS_VERSION = 2  # the layout of analysis.json; a cache of another layout is measured again
CORRUPTIONS = ("brightness", "contrast", "gaussian_noise", "jpeg")
# severity 1..5 parameters, after the CIFAR-10-C benchmark's (Hendrycks & Dietterich, 2019)
SEVERITY_PARAMETERS = {
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to every pixel
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # distance to the image mean scaled by this
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise standard deviation
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
}


@dataclass
class AnalysisSettings:
    """How much the analysis measures; stored beside its results so a cached analysis is reused only
    when it was made the same way."""

    limit: int = 1000  # images: a class-balanced subset of the run's evaluation data
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    composition_batch: int = 32
    severities: tuple[int, ...] = (1, 3, 5)
    budget_points: int = 5
    worst_policies: int = 20  # the run's lowest-scoring worst-case policies, for the low-bit frequency
    ship_policy: str = "w8a8"  # the policy a team ships (quantize_dynamic's default): the report starts with it
    kernels: tuple[str, ...] = ()  # kernel families the ship policy is measured under (empty: the run's fleet)


@dataclass
class SensitivityRow:
    """One layer alone at `bits` (weights and activations), the others at the base policy."""

    layer: str
    bits: int
    accuracy: float
    drop_points: float


@dataclass
class LowBitFrequency:
    policies: int  # how many worst policies were counted
    layers: dict[str, float]  # layer name -> share of them giving it an operand below the top width


@dataclass
class ClassRow:
    class_name: str
    images: int
    fp32_accuracy: float
    worst_accuracy: float
    drop_points: float


@dataclass
class FlippedInput:
    index: int
    class_name: str
    fp32_label: str
    worst_label: str
    range_score: float
    text: str | None = None  # the sentence, for text data


@dataclass
class LengthRow:
    """Text: accuracy over the sentences of one length band (in tokens, special tokens included)."""

    tokens: str  # e.g. "11-20"
    sentences: int
    fp32_accuracy: float
    worst_accuracy: float
    drop_points: float


@dataclass
class PaddingRow:
    """Text: the worst policy under one padding scenario (padded positions enter the activation ranges)."""

    padding: str  # text_data.PADDINGS
    scenario: str  # in words
    fp32_accuracy: float
    worst_accuracy: float
    drop_points: float


RANGE_SCORE = "an input's largest activation range at a quantized layer's input, over that layer's median"


@dataclass
class PerInput:
    """Inputs the worst policy flips (right in fp32, wrong under it) and the drop per class."""

    images: int
    flipped: int
    flipped_fraction: float
    flipped_inputs: list[FlippedInput]  # at most 50, highest range score first
    mean_range_score_flipped: float | None
    mean_range_score_kept: float | None
    per_class: list[ClassRow]
    range_score: str = RANGE_SCORE


@dataclass
class BatchSizeRow:
    batch_size: int
    worst_accuracy: float


@dataclass
class BatchComposition:
    """The other inputs' worst-case accuracy alone, in ordinary batches, and beside the highest-range input."""

    batch_size: int
    outlier_index: int
    outlier_class: str
    outlier_range_score: float
    alone_accuracy: float
    ordinary_batches_accuracy: float
    with_outlier_accuracy: float


@dataclass
class CorruptionRow:
    corruption: str
    severity: int
    fp32_accuracy: float
    worst_accuracy: float
    drop_points: float


@dataclass
class BudgetPoint:
    """At one budget level, the policy picked among those the search scored, re-measured on ORT."""

    budget_effective_bits: float
    policy_effective_bits: float
    ort_accuracy: float
    digest: str


@dataclass
class ShipKernels:
    """The ship policy under one kernel family."""

    kernel_family: str
    source: str  # ORT (this machine's family) or emulated (the simulator's emulation of the family)
    accuracy: float  # on the whole evaluation data, at the run's batch size
    drop_points: float
    batch_sizes: list[BatchSizeRow]  # on the analysis subset
    corruptions: list[CorruptionRow]  # on the analysis subset; worst_accuracy is the ship policy's


MITIGATIONS = 3  # the most mitigations a policy is measured with (policy.mitigations)


@dataclass
class Mitigation:
    """The ship policy with one mitigation of the avx2-u8s8 saturation, on the whole evaluation data."""

    change: str  # what it changes, e.g. "uint8 weights"
    policy: str
    kernels: dict[str, float]  # accuracy under each family of the fleet

    @property
    def lowest(self) -> float:
        return min(self.kernels.values())


@dataclass
class ShipPolicy:
    """The policy a team ships, measured first: per kernel family, batch size and corruption, and with each
    mitigation of the saturation."""

    policy: str
    description: str
    effective_bits: float
    images: int  # the whole evaluation data
    fp32_accuracy: float  # on the whole evaluation data
    kernels: list[ShipKernels]
    mitigations: list[Mitigation] = dataclasses.field(default_factory=list)

    @property
    def lowest(self) -> float:
        return min(k.accuracy for k in self.kernels)

    @property
    def recommendation(self) -> str:
        """Which mitigation to ship with, if any: the first (least intrusive) of those whose lowest accuracy
        over the fleet is highest, when that beats the policy as it is."""
        best = max(self.mitigations, key=lambda m: m.lowest, default=None)
        if best is None or best.lowest <= self.lowest:
            return (f"no mitigation needed: none raises {self.policy}'s lowest accuracy over the kernel families "
                    f"({100 * self.lowest:.2f}%)")
        return (f"ship {self.policy} with {best.change}: its lowest accuracy over the kernel families rises from "
                f"{100 * self.lowest:.2f}% to {100 * best.lowest:.2f}%")


ANALYSIS_NUMBERS = ("every accuracy is ONNX Runtime's on this subset of the evaluation data, except ship_policy's "
                    "accuracy (the whole evaluation data) and the emulated kernel families (the simulator's emulation)")


@dataclass(kw_only=True)
class Analysis:
    """The vulnerability analysis of a run, as analysis.json holds it (its keys are these fields)."""

    schema_version: int = ANALYSIS_VERSION
    kind: str = "analysis"
    settings: AnalysisSettings
    inputs: dict[str, str]  # the model's and data's sha256: a cached analysis is of these
    dataset: str
    images: int
    batch_size: int
    fp32_accuracy: float
    worst_accuracy: float
    base_policy: str
    layer_sensitivity: list[SensitivityRow]
    low_bit_frequency: LowBitFrequency
    per_input: PerInput
    batch_sizes: list[BatchSizeRow]
    batch_composition: BatchComposition
    corruptions: list[CorruptionRow]  # image corruptions, or text perturbations (text_data.TEXT_PERTURBATIONS)
    corruptions_skipped: str | None = None  # why no corruption was measured
    unit: str = "images"  # what an example is: images, sentences, or (pre-tokenized) examples
    by_length: list[LengthRow] = dataclasses.field(default_factory=list)  # text
    padding: list[PaddingRow] = dataclasses.field(default_factory=list)  # text
    budget_curves: dict[str, list[BudgetPoint]]  # objective -> points, lowest budget first
    ship_policy: ShipPolicy | None = None
    kernel_family: str = ""  # the family of the machine whose ORT kernels measured the analysis
    # a robust distill run's teacher, measured the same way (drops from the teacher's fp32), to compare with
    teacher_layer_sensitivity: list[SensitivityRow] = dataclasses.field(default_factory=list)
    numbers: str = ANALYSIS_NUMBERS
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return without_none(dataclasses.asdict(self), ("corruptions_skipped", "ship_policy"))

    @classmethod
    def from_dict(cls, values, where: str | Path, hint: str = "") -> "Analysis":
        """An analysis.json read back: its version and fields checked (PtqauditError naming `where` and the field)."""
        check_schema_version(values, where, ANALYSIS_VERSION, hint)
        check_fields(values, ANALYSIS, where, hint)
        return typed_from_dict(cls, values)


@dataclass
class SearchRun:
    """A search run folder as the report reads it (for a distill run: its audit/ search, plus its summary)."""

    path: Path
    config: SearchConfig
    summary: SearchSummary
    model: LoadedModel
    distill: DistillSummary | None = None  # when the report is of a distill run

    @property
    def data(self) -> DataConfig:
        return self.config.data

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def policy(self, objective: Objective) -> ResolvedPolicy | None:
        case = self.summary.case(objective)
        if case is None:
            return None
        return load_policy(str(self.path / case.policy_file)).resolve(self.model.layers)


RUN_KINDS = ("search", "distill")


def _run_kind(summary, where: Path) -> str:
    """summary.json's kind of run. A file written before the field existed has none: a distill summary is
    the one with a mode and an audit."""
    if not isinstance(summary, dict):
        return "search"  # SearchSummary.from_dict names what is wrong
    kind = summary.get("kind", "distill" if "mode" in summary and "audit" in summary else "search")
    if kind not in RUN_KINDS:
        what = json.dumps(kind[:40]) if isinstance(kind, str) else "not a string"
        raise PtqauditError(f"{where}: field kind is {what}, expected {' or '.join(RUN_KINDS)}; "
                            "the file was changed since ptqaudit wrote it")
    return kind


def load_run(run_dir: str | Path, model_path: str | None = None) -> SearchRun:
    """Read a `search` or `distill` run folder; the model comes from run.json unless model_path is given."""
    root = Path(run_dir)
    if not (root / "summary.json").is_file():
        raise PtqauditError(f"{root} holds no finished run (no summary.json): give the -o folder of `ptqaudit search` "
                            "or `ptqaudit distill`")
    summary = read_json(root / "summary.json")
    distill = None
    if _run_kind(summary, root / "summary.json") == "distill":  # report on its audit, a search of the student
        distill = DistillSummary.from_dict(summary, root / "summary.json")
        root = root / distill.audit.run
        if model_path is None:
            model_path = str(Path(run_dir) / distill.student_file)
        summary = read_json(root / "summary.json")
    search = SearchSummary.from_dict(summary, root / "summary.json")
    config = SearchConfig.from_dict(read_checked(root / "run.json", SEARCH_RUN_FILE)["config"])
    path = model_path or config.model
    if not Path(path).is_file():
        raise PtqauditError(f"model {path} named by {root / 'run.json'} not found (relative paths are read from the "
                            "current folder): pass --model PATH")
    # a model that leaves input dims symbolic takes them from one example of the run's data
    model = load_model(path, lambda: load_dataset(dataclasses.replace(config.data, limit=1)).x.shape[1:],
                       config.optimize)
    return SearchRun(root, config, search, model, distill)


def case_under_kernels(run: SearchRun, objective: Objective, families: list[str], progress: bool = True) -> dict[str, float]:
    """The accuracy of the run's `objective` policy under each of `families` over the whole evaluation data,
    at the run's batch size: ORT's kernels for this machine's family, the simulator's emulation for another."""
    if not families:
        return {}
    policy, dataset = run.policy(objective), load_dataset(run.data)
    engines = KernelEngines(run.model)
    return {family: accuracy(engines.predict(policy, family, dataset, run.batch_size, f"{objective} case, {family}",
                                             progress).labels, dataset.y) for family in families}


ANALYSIS_DATA, WHOLE_DATA = "analysis", "whole"  # the analysis subset, and the run's whole evaluation data


def corruption_key(kind: str, severity: int) -> str:
    return f"{kind} {severity}"


def padding_key(padding: str) -> str:
    return f"padding {padding}"


class _Meter:
    """ORT predictions of policies on the analysis's datasets (by key), each measured once, many at a time on
    the worker pool (prefetch), and one progress bar counting what the sections read."""

    def __init__(self, run: SearchRun, datasets: dict[str, Dataset], progress: bool, total: int,
                 workers: WorkerSettings, desc: str = "analysis on ORT"):
        self.run, self.datasets, self.dataset = run, datasets, datasets[ANALYSIS_DATA]
        self.pool = EvaluationPool(run.model, datasets, workers)
        self.bar = Progress(total, desc, "run", progress)
        self._labels: dict = {}
        self._counted: set = set()  # measured by prefetch, which moved the bar already: not counted when read

    def _key(self, policy: ResolvedPolicy | None, data: str, batch_size: int | None) -> tuple:
        return None if policy is None else policy.digest, data, batch_size or self.run.batch_size

    def prefetch(self, wanted: list[tuple[ResolvedPolicy | None, str, int | None]]) -> None:
        """Measure at once, on the pool's workers, every (policy, data key, batch size) not measured yet."""
        missing = {}
        for policy, data, batch_size in wanted:
            key = self._key(policy, data, batch_size)
            if key not in self._labels:
                missing.setdefault(key, Request(policy, data, key[2]))
        keys = list(missing)

        def done(index: int) -> None:  # the bar moves as results arrive, not when a section reads them
            self.bar.update(1)
            self._counted.add(keys[index])

        for key, predictions in zip(keys, self.pool.predict(list(missing.values()), done=done)):
            self._labels[key] = predictions.labels

    def labels(self, policy: ResolvedPolicy | None, data: str = ANALYSIS_DATA, batch_size: int | None = None):
        """Predicted labels of `policy` on the dataset `data` at `batch_size` (default: the run's)."""
        self.prefetch([(policy, data, batch_size)])
        key = self._key(policy, data, batch_size)
        if key in self._counted:
            self._counted.discard(key)
        else:  # read again (a section sharing another's measurement): a step of its own
            self.bar.update(1)
        return self._labels[key]

    def accuracy(self, policy, data: str = ANALYSIS_DATA, batch_size: int | None = None) -> float:
        return accuracy(self.labels(policy, data, batch_size), self.datasets[data].y)


def _low_bits(run: SearchRun) -> list[int]:
    bits = sorted(run.config.bits)
    return [b for b in bits if b < bits[-1]]


def layer_sensitivity(meter: _Meter, run: SearchRun, base: ResolvedPolicy, reference: float) -> list[SensitivityRow]:
    """Each layer alone at each low width (weights and activations), the others at the base policy."""
    probes = []
    for layer in run.model.layers:
        setting = base.mapping[layer.name]
        if setting is None:
            continue
        for bits in _low_bits(run):
            mapping = dict(base.mapping)
            mapping[layer.name] = LayerQuant(bits, bits, setting.per_channel)
            probes.append((layer.name, bits, ResolvedPolicy(f"{layer.name}@{bits}", mapping, base.options)))
    meter.prefetch([(policy, ANALYSIS_DATA, None) for _, _, policy in probes])
    return [SensitivityRow(name, bits, acc, drop_points(reference, acc)) for name, bits, policy in probes
            for acc in [meter.accuracy(policy)]]


def teacher_run(run: SearchRun) -> SearchRun | None:
    """A robust distill run's search of its teacher (distill.TEACHER_AUDIT, beside the student's audit), if any."""
    if run.distill is None or run.distill.teacher_audit is None:
        return None
    return load_run(run.path.parent / run.distill.teacher_audit.run)


def teacher_sensitivity(teacher: SearchRun, dataset: Dataset, progress: bool,
                        workers: WorkerSettings) -> list[SensitivityRow]:
    """The teacher's per-layer sensitivity on the same examples, as layer_sensitivity measures the student's."""
    base = load_policy(teacher.config.base_policy).resolve(teacher.model.layers)
    probes = sum(base.mapping[layer.name] is not None for layer in teacher.model.layers) * len(_low_bits(teacher))
    meter = _Meter(teacher, {ANALYSIS_DATA: dataset}, progress, 1 + probes, workers, "teacher's sensitivity on ORT")
    with meter.pool:
        rows = layer_sensitivity(meter, teacher, base, meter.accuracy(None))
    meter.bar.close()
    return rows


def low_bit_frequency(run: SearchRun, count: int) -> LowBitFrequency:
    """How often each layer has an operand below the top width among the worst policies the search found
    (its verified candidates and its lowest-scoring traced worst-case policies)."""
    top = max(run.config.bits)
    policies = [c.layers for c in run.summary.worst.candidates] if run.summary.worst else []
    trace = [r for r in RunFolder(run.path).read_trace() if r.get("objective") == Objective.WORST and "policy" in r]
    trace.sort(key=lambda r: r["sim_accuracy"])
    policies += [r["policy"] for r in trace[:count]]
    if not policies:
        return LowBitFrequency(0, {})
    frequency = {}
    for layer in run.model.layers:
        low = 0
        for policy in policies:
            setting = LayerQuant.from_label(policy.get(layer.name, "fp32"))
            low += setting is not None and min(setting.weight_bits, setting.activation_bits) < top
        frequency[layer.name] = low / len(policies)
    return LowBitFrequency(len(policies), frequency)


def activation_ranges(model: LoadedModel, dataset: Dataset) -> np.ndarray:
    """[inputs, layers]: each input's activation range (max - min) at the input of every layer that quantizes
    one (embeddings do not), in full precision (ORT, the tensors made graph outputs), divided by that layer's
    median range."""
    nodes = {node.name: node for node in model.proto.graph.node}
    measured = [layer for layer in model.layers if not layer.kind.weight_only]
    inputs = [layer.kind.activation_input(nodes[layer.name]) for layer in measured]
    names = list(dict.fromkeys(inputs))
    session = make_session(with_outputs(model.proto, names))
    outputs = [o.name for o in session.get_outputs()]
    index = [outputs.index(n) for n in names]
    ranges = []
    for x, _ in dataset.batches(100):
        values = session.run(None, feeds(x, model.inputs))
        ranges.append(np.stack([np.ptp(values[i].reshape(len(x), -1), axis=1) for i in index], axis=1))
    ranges = np.concatenate(ranges)
    column = {n: i for i, n in enumerate(names)}
    per_layer = ranges[:, [column[name] for name in inputs]]
    return per_layer / np.maximum(np.median(per_layer, axis=0, keepdims=True), 1e-12)


def per_input(meter: _Meter, run: SearchRun, worst: ResolvedPolicy, relative_ranges: np.ndarray) -> PerInput:
    """Inputs the worst policy flips (right in fp32, wrong under it), per-class drops, and how the
    flipped inputs' activation ranges compare with the others'."""
    data = meter.dataset
    fp32, low = meter.labels(None), meter.labels(worst)
    flipped = (fp32 == data.y) & (low != data.y)
    range_score = relative_ranges.max(axis=1)  # an input's largest range relative to the layer's median
    classes = []
    for c, name in enumerate(data.classes):
        members = data.y == c
        if members.any():
            fp_acc, low_acc = float(np.mean(fp32[members] == c)), float(np.mean(low[members] == c))
            classes.append(ClassRow(name, int(members.sum()), fp_acc, low_acc, drop_points(fp_acc, low_acc)))
    order = np.argsort(-range_score[flipped]) if flipped.any() else np.array([], dtype=int)
    flipped_index = np.flatnonzero(flipped)[order]
    return PerInput(
        images=len(data), flipped=int(flipped.sum()), flipped_fraction=float(flipped.mean()),
        flipped_inputs=[FlippedInput(int(i), data.classes[data.y[i]], data.classes[fp32[i]], data.classes[low[i]],
                                     float(range_score[i]), _sentence(data, i)) for i in flipped_index[:50]],
        mean_range_score_flipped=float(range_score[flipped].mean()) if flipped.any() else None,
        mean_range_score_kept=float(range_score[~flipped].mean()) if (~flipped).any() else None,
        per_class=classes)


def batch_sizes(meter: _Meter, worst: ResolvedPolicy, sizes: tuple[int, ...]) -> list[BatchSizeRow]:
    meter.prefetch([(worst, ANALYSIS_DATA, b) for b in sizes])
    return [BatchSizeRow(b, meter.accuracy(worst, batch_size=b)) for b in sizes]


def _sentence(data: Dataset, index: int) -> str | None:
    return data.x.texts[index] if data.is_text and data.x.texts is not None else None


LENGTH_BANDS = (10, 20, 30, 40)  # upper ends of the sentence-length bands, in tokens; the last band is open


def by_length(meter: _Meter, worst: ResolvedPolicy) -> list[LengthRow]:
    """Text: FP32 and worst-case accuracy by sentence length (tokens), on the analysis data."""
    data = meter.dataset
    fp32, low = meter.labels(None), meter.labels(worst)
    rows, start = [], 1
    for end in (*LENGTH_BANDS, None):
        members = (data.x.lengths >= start) & (data.x.lengths <= (end if end is not None else np.inf))
        if members.any():
            fp_acc = float(np.mean(fp32[members] == data.y[members]))
            low_acc = float(np.mean(low[members] == data.y[members]))
            rows.append(LengthRow(f"{start}-{end}" if end is not None else f"{start}+", int(members.sum()), fp_acc,
                                  low_acc, drop_points(fp_acc, low_acc)))
        start = (end or 0) + 1
    return rows


def padding_scenarios(meter: _Meter, run: SearchRun, worst: ResolvedPolicy) -> list[PaddingRow]:
    """Text: the worst policy with each batch padded to its longest sentence and with every sentence padded to
    --max-length, at the run's batch size (the same sentences; only the padded positions differ)."""
    meter.prefetch([(policy, padding_key(padding), None) for padding in PADDINGS for policy in (None, worst)])
    rows = []
    for padding in PADDINGS:
        key = padding_key(padding)
        fp_acc, low_acc = meter.accuracy(None, key), meter.accuracy(worst, key)
        rows.append(PaddingRow(padding, describe_padding(meter.datasets[key].x), fp_acc, low_acc,
                               drop_points(fp_acc, low_acc)))
    return rows


def padded_datasets(run: SearchRun, dataset: Dataset) -> dict[str, Dataset]:
    """Text: the analysis data padded per batch and to --max-length (the same sentences), by padding_key."""
    padded = {}
    for padding in PADDINGS:
        inputs = dataset.x.with_padding(padding, run.data.text.max_length)
        padded[padding_key(padding)] = dataclasses.replace(dataset, name=f"{dataset.name} ({padding})", x=inputs)
    return padded


def batch_composition(meter: _Meter, worst: ResolvedPolicy, relative_ranges: np.ndarray, size: int) -> BatchComposition:
    """Per-tensor dynamic ranges are shared by a batch: the accuracy of the other inputs when the
    highest-range input joins each batch, against the same inputs in ordinary batches and alone."""
    data = meter.dataset
    outlier = int(np.argmax(relative_ranges.max(axis=1)))
    others = np.flatnonzero(np.arange(len(data)) != outlier)
    chunks = [others[i:i + size - 1] for i in range(0, len(others), size - 1)]
    session = meter.pool.local.session(worst)

    def labels(indices: np.ndarray) -> np.ndarray:
        x = data.x[indices]
        return session.run(None, feeds(x.trimmed() if data.is_text else x, meter.run.model.inputs))[0].argmax(axis=1)

    with_outlier = [labels(np.append(chunk, outlier))[:-1] for chunk in chunks]
    meter.bar.update(1)
    ordinary = [labels(others[start:start + size]) for start in range(0, len(others), size)]
    meter.bar.update(1)
    alone = meter.labels(worst, batch_size=1)[others]
    y = data.y[others]
    return BatchComposition(size, outlier, data.classes[data.y[outlier]], float(relative_ranges[outlier].max()),
                            alone_accuracy=float(np.mean(alone == y)),
                            ordinary_batches_accuracy=float(np.mean(np.concatenate(ordinary) == y)),
                            with_outlier_accuracy=float(np.mean(np.concatenate(with_outlier) == y)))


def corrupt(x: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """A copy of x (NCHW float32 in [0, 1]) under a common corruption at severity 1..5."""
    parameter = SEVERITY_PARAMETERS[kind][severity - 1]
    if kind == "brightness":
        out = x + parameter
    elif kind == "contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        out = (x - mean) * parameter + mean
    elif kind == "gaussian_noise":
        out = x + np.random.default_rng(seed).normal(0, parameter, size=x.shape).astype(np.float32)
    elif kind == "jpeg":
        out = np.stack([_jpeg(image, parameter) for image in x])
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return np.clip(out, 0, 1).astype(np.float32)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    mode_image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    mode_image.save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer), dtype=np.float32) / 255
    return decoded[None] if pixels.shape[0] == 1 else decoded.transpose(2, 0, 1)


CORRUPTIONS_NEED = "the data's pixels are not scaled to [0, 1], so the corruptions do not apply"
PERTURBATIONS_NEED = "the data is pre-tokenized (no sentences), so the text perturbations do not apply"


def corrupted_datasets(run: SearchRun, limit: int, severities: tuple[int, ...]) -> list[tuple[str, int, Dataset]] | None:
    """(corruption, severity, data) for each corruption of the analysis subset: image corruptions on the raw
    [0, 1] images (normalised after), None when the pixels are not in [0, 1]; text perturbations of the
    sentences, tokenized as the run's data, None for pre-tokenized data."""
    raw = load_dataset(dataclasses.replace(run.data, mean=None, std=None, limit=limit))
    if raw.is_text:
        return _perturbed_datasets(run, raw, severities)
    if raw.x.min() < 0 or raw.x.max() > 1:
        return None
    channels = raw.x.shape[1]
    mean = np.broadcast_to(np.asarray(run.data.mean or [0.0], np.float32), (channels,)).reshape(1, -1, 1, 1)
    std = np.broadcast_to(np.asarray(run.data.std or [1.0], np.float32), (channels,)).reshape(1, -1, 1, 1)
    sets = []
    for kind in CORRUPTIONS:
        if kind == "jpeg" and channels not in (1, 3):
            continue
        for severity in severities:
            x = (corrupt(raw.x, kind, severity) - mean) / std
            sets.append((kind, severity, Dataset(f"{raw.name}+{kind}{severity}", x.astype(np.float32), raw.y, raw.classes)))
    return sets


def _perturbed_datasets(run: SearchRun, raw: Dataset, severities: tuple[int, ...]) -> list[tuple[str, int, Dataset]] | None:
    if raw.x.texts is None:
        return None
    sets = []
    for kind in TEXT_PERTURBATIONS:
        for severity in severities:
            inputs = tokenize(perturb(raw.x.texts, kind, severity), run.data.text)
            sets.append((kind, severity, Dataset(f"{raw.name}+{kind}{severity}", inputs, raw.y, raw.classes)))
    return sets


def corruptions(meter: _Meter, worst: ResolvedPolicy, sets: list[tuple[str, int, Dataset]]) -> list[CorruptionRow]:
    """FP32 and worst-case accuracy under each corruption."""
    meter.prefetch([(policy, corruption_key(kind, severity), None) for kind, severity, _ in sets
                    for policy in (None, worst)])
    rows = []
    for kind, severity, _ in sets:
        key = corruption_key(kind, severity)
        fp_acc, low_acc = meter.accuracy(None, key), meter.accuracy(worst, key)
        rows.append(CorruptionRow(kind, severity, fp_acc, low_acc, drop_points(fp_acc, low_acc)))
    return rows


def measure_ship_policy(meter: _Meter, run: SearchRun, settings: AnalysisSettings, fleet: tuple[str, ...],
                sets: list[tuple[str, int, Dataset]] | None, fp32_corrupted: list[CorruptionRow]) -> ShipPolicy:
    """The ship policy under each family of the fleet: on the whole evaluation data at the run's batch
    size, then on the analysis subset at each batch size and under each corruption."""
    loaded = load_policy(settings.ship_policy)
    policy = loaded.resolve(run.model.layers)
    whole = meter.datasets[WHOLE_DATA]
    engines = KernelEngines(run.model)
    native = engines.native
    fp32 = run.summary.fp32_accuracy  # the same data and batch size; FP32 runs no integer kernel
    variants = mitigations(policy)
    if native in fleet:  # this machine's family: ORT's own numbers, measured at once on the workers
        meter.prefetch([(policy, WHOLE_DATA, None)]
                       + [(policy, corruption_key(kind, severity), None) for kind, severity, _ in sets or []]
                       + [(policy, ANALYSIS_DATA, b) for b in settings.batch_sizes]
                       + [(variant, WHOLE_DATA, None) for _, variant in variants])

    def measure(subject: ResolvedPolicy, family: str, data: str, batch_size: int | None = None) -> float:
        if family == native:
            return meter.accuracy(subject, data, batch_size)
        dataset = meter.datasets[data]
        labels = engines.predict(subject, family, dataset, batch_size or run.batch_size, "", progress=False).labels
        meter.bar.update(1)
        return accuracy(labels, dataset.y)

    rows = []
    for family in fleet:
        acc = measure(policy, family, WHOLE_DATA)
        corrupted = [CorruptionRow(kind, severity, base.fp32_accuracy, low, drop_points(base.fp32_accuracy, low))
                     for (kind, severity, _), base in zip(sets or [], fp32_corrupted)
                     for low in [measure(policy, family, corruption_key(kind, severity))]]
        rows.append(ShipKernels(family, kernel_source(family), acc, drop_points(fp32, acc),
                                [BatchSizeRow(b, measure(policy, family, ANALYSIS_DATA, b)) for b in settings.batch_sizes],
                                corrupted))
    measured = [Mitigation(change, variant.name, {family: measure(variant, family, WHOLE_DATA) for family in fleet})
                for change, variant in variants]
    return ShipPolicy(loaded.name, loaded.description, policy.effective_bits(run.model.layers), len(whole), fp32, rows,
                      measured)


def budget_curves(meter: _Meter, run: SearchRun, points: int) -> dict[str, list[BudgetPoint]]:
    """Accuracy versus budget from the policies the search scored: at each budget level the lowest-scoring
    worst-case policy costing at least it, and the highest-scoring best-case policy costing at most it,
    each re-measured on ORT (once: the meter remembers a policy it has measured)."""
    trace = [r for r in RunFolder(run.path).read_trace() if "effective_bits" in r and r.get("objective") in OBJECTIVES]
    if not trace:
        return {str(objective): [] for objective in OBJECTIVES}
    costs = [r["effective_bits"] for r in trace]
    levels = np.linspace(min(costs), max(costs), points)
    picks = []  # (objective, level, the trace record picked)
    for objective in OBJECTIVES:
        records = [r for r in trace if r["objective"] == objective]
        for level in levels:
            # a policy counts at a level within rounding of its own cost
            admitted = [r for r in records if objective.admits(r["effective_bits"], level + objective.sign * 1e-9)]
            if admitted:
                picks.append((objective, level, objective.pick(admitted, lambda r: r["sim_accuracy"])))
    policies = [_policy_from_labels(run, pick["policy"]) for _, _, pick in picks]
    meter.prefetch([(policy, ANALYSIS_DATA, None) for policy in policies])
    curves = {str(objective): [] for objective in OBJECTIVES}
    for (objective, level, pick), policy in zip(picks, policies):
        curves[str(objective)].append(BudgetPoint(float(level), pick["effective_bits"], meter.accuracy(policy),
                                                  pick["digest"]))
    return curves


def _policy_from_labels(run: SearchRun, labels: dict) -> ResolvedPolicy:
    return ResolvedPolicy("traced", {layer.name: LayerQuant.from_label(labels.get(layer.name, "fp32"))
                                     for layer in run.model.layers}, load_policy(run.config.base_policy).options)


def analyse(run: SearchRun, settings: AnalysisSettings, progress: bool = True, echo=print,
            workers: WorkerSettings = WorkerSettings()) -> Analysis:
    """Every measurement of the analysis on a class-balanced subset of the run's evaluation data; the ORT
    evaluations run on `workers` (identical numbers for any number of them)."""
    worst = run.policy(Objective.WORST)
    if worst is None:
        raise PtqauditError(f"{run.path} has no worst case (searched with --objective best): the vulnerability "
                            "analysis follows the worst policy")
    started = time.perf_counter()
    dataset = load_dataset(dataclasses.replace(run.data, limit=settings.limit))
    base = load_policy(run.config.base_policy).resolve(run.model.layers)
    fleet = settings.kernels or tuple(run.summary.kernels) or (detect_kernel_family(),)
    kinds = len(TEXT_PERTURBATIONS) if dataset.is_text else 4 if dataset.x.shape[1] in (1, 3) else 3
    corruption_runs = kinds * len(settings.severities)
    total = (len(run.model.layers) * len(_low_bits(run)) + 4 + len(settings.batch_sizes) + 3
             + 2 * corruption_runs + 2 * settings.budget_points + 2 * len(PADDINGS) * dataset.is_text
             + len(fleet) * (1 + len(settings.batch_sizes) + corruption_runs + MITIGATIONS))
    corrupted = corrupted_datasets(run, settings.limit, settings.severities)
    datasets = {ANALYSIS_DATA: dataset, WHOLE_DATA: load_dataset(run.data),
                **{corruption_key(kind, severity): data for kind, severity, data in corrupted or []},
                **(padded_datasets(run, dataset) if dataset.is_text else {})}
    meter = _Meter(run, datasets, progress, total, workers)
    echo(f"analysing {run.model.path.name} on {len(dataset)} {dataset.unit} of {dataset.name} with ONNX Runtime "
         f"({dataset.padding_note}batch size {run.batch_size}); cached in {run.path / ANALYSIS_FILE}")
    with meter.pool:
        result = _measure(run, settings, meter, worst, base, fleet, corrupted)
    meter.bar.close()
    teacher = teacher_run(run)
    if teacher is not None:
        result.teacher_layer_sensitivity = teacher_sensitivity(teacher, dataset, progress, workers)
    result.seconds = time.perf_counter() - started
    write_json(run.path / ANALYSIS_FILE, result.to_dict())
    return result


def _measure(run: SearchRun, settings: AnalysisSettings, meter: _Meter, worst: ResolvedPolicy, base: ResolvedPolicy,
             fleet: tuple[str, ...], corrupted) -> Analysis:
    """The analysis's sections, in order, on the meter's datasets."""
    dataset = meter.dataset
    meter.prefetch([(None, ANALYSIS_DATA, None), (worst, ANALYSIS_DATA, None)])
    fp32 = meter.accuracy(None)
    relative_ranges = activation_ranges(run.model, dataset)
    corruption_rows = corruptions(meter, worst, corrupted) if corrupted is not None else None
    result = Analysis(
        settings=settings, inputs=input_identity(run.model.path, [dataset]), dataset=dataset.name,
        images=len(dataset), batch_size=run.batch_size, fp32_accuracy=fp32, worst_accuracy=meter.accuracy(worst),
        base_policy=run.config.base_policy,
        layer_sensitivity=layer_sensitivity(meter, run, base, fp32),
        low_bit_frequency=low_bit_frequency(run, settings.worst_policies),
        per_input=per_input(meter, run, worst, relative_ranges),
        batch_sizes=batch_sizes(meter, worst, settings.batch_sizes),
        batch_composition=batch_composition(meter, worst, relative_ranges, settings.composition_batch),
        corruptions=corruption_rows or [],
        corruptions_skipped=(None if corruption_rows is not None else PERTURBATIONS_NEED if dataset.is_text
                             else CORRUPTIONS_NEED),
        unit=dataset.unit,
        by_length=by_length(meter, worst) if dataset.is_text else [],
        padding=padding_scenarios(meter, run, worst) if dataset.is_text else [],
        budget_curves=budget_curves(meter, run, settings.budget_points),
        ship_policy=measure_ship_policy(meter, run, settings, fleet, corrupted, corruption_rows or []),
        kernel_family=detect_kernel_family())
    return result


def cached_analysis(run: SearchRun, settings: AnalysisSettings) -> Analysis | None:
    """The stored analysis when it was made with these settings on the same model and data (by content:
    another --model file, or data that changed, are measured again), else None. One of another layout
    (an older ptqaudit's) is measured again too: it is a cache."""
    path = run.path / ANALYSIS_FILE
    if not path.is_file():
        return None
    stored = read_json(path)
    if not isinstance(stored, dict) or stored.get("schema_version", 1) != ANALYSIS_VERSION:
        return None
    as_stored = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
    if stored.get("settings") != as_stored:
        return None
    inputs = input_identity(run.model.path, [load_dataset(dataclasses.replace(run.data, limit=settings.limit))])
    if stored.get("inputs") != inputs:
        return None
    if run.distill is not None and run.distill.teacher_audit is not None and not stored.get("teacher_layer_sensitivity"):
        return None  # made before the teacher was measured beside the student
    return Analysis.from_dict(stored, path, " (--recompute measures the analysis again)")
