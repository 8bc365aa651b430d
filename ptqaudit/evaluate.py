"""Evaluating policies: ORT sessions, batched predictions, accuracy, agreement, throughput, engines."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from .data import Dataset, check_input_shape
from .text_data import feeds
from .errors import GateFailed, PtqauditError
from .gate import Check, Gate
from .kernels import detect_kernel_family
from .onnx_graph import LoadedModel, ort_errors, ort_failure
from .policy import FP32_BITS, Policy, ResolvedPolicy, bitops_of
from .predictions import Predictions, accuracy, drop_points
from .progress import track
from .quantize import QuantizedModel, quantize
from .sim.engine import EngineAgreement, sim_predict
from .sim.model import SimModel

ORT_INPUT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
DEVICES = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def make_session(model: onnx.ModelProto | QuantizedModel, device: str = "cpu", threads: int = 0) -> ort.InferenceSession:
    """An ORT session with the default graph optimisations (what a deployment runs), for a graph or for a
    quantized model, whose session config entries (its policy's session option) it applies. threads = 0
    lets ORT choose; integer kernels without a CUDA version fall back to the CPU."""
    providers = DEVICES[device]
    proto = model.proto if isinstance(model, QuantizedModel) else model
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise PtqauditError("--device cuda needs onnxruntime-gpu (pip install 'ptqaudit[gpu]') and a CUDA device")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # ORT's warnings about unused initializers are noise here, and its error log repeats the
    # exception, which becomes the one line shown
    options.log_severity_level = 4
    for key, value in (model.session_config if isinstance(model, QuantizedModel) else {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
    except Exception as exc:
        raise PtqauditError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from exc


def predict(session: ort.InferenceSession, dataset: Dataset, batch_size: int, desc: str, progress: bool = True,
            model: str = "the model") -> Predictions:
    """Logits for every example, fed in order in batches of batch_size: the activation range of a
    dynamically quantized layer is taken over the whole batch, so the batching is part of the result.
    A run ORT refuses (e.g. a graph asking for more memory than there is) is a PtqauditError naming `model`."""
    inputs = [(i.name, ORT_INPUT_TYPES.get(i.type, np.float32)) for i in session.get_inputs()]
    outputs, seconds = [], 0.0
    batches = dataset.batches(batch_size)
    total = -(-len(dataset) // batch_size)
    for x, _ in track(batches, desc, "batch", progress, total):
        start = time.perf_counter()
        try:
            (logits,) = session.run(None, feeds(x, inputs))
        except ort_errors() as exc:
            raise ort_failure(exc, model, desc) from exc
        seconds += time.perf_counter() - start
        outputs.append(logits)
    logits = np.concatenate(outputs)
    if logits.ndim != 2 or logits.shape[0] != len(dataset):
        raise PtqauditError(f"not a classifier: the model's output has shape {list(logits.shape)} for {len(dataset)} inputs, expected [N, classes]")
    return Predictions(logits, seconds)


def check_model_fits_data(model: LoadedModel, dataset: Dataset, batch_size: int) -> None:
    if model.is_text or dataset.is_text:
        check_text_fits(model, dataset)
    else:
        check_input_shape(dataset, model.input_shape)
    batch_dim = model.input_shape[0] if model.input_shape else None
    if isinstance(batch_dim, int) and batch_dim > 0 and batch_dim != batch_size:
        raise PtqauditError(f"model input has a fixed batch size of {batch_dim}; run with --batch-size {batch_dim}")
    if model.num_classes is not None and len(dataset.classes) > model.num_classes:
        raise PtqauditError(
            f"dataset {dataset.name} has {len(dataset.classes)} classes but the model outputs {model.num_classes} scores"
        )


def check_text_fits(model: LoadedModel, dataset: Dataset) -> None:
    """A text model meets text data: inputs matched by name (tokenized text offers input_ids, attention_mask and
    token_type_ids; a .npz must hold exactly the model's inputs), token ids within each embedding table, and
    sequences no longer than the position table."""
    if not (model.is_text and dataset.is_text):
        kind = "a text model" if model.is_text else "an image model"
        raise PtqauditError(f"{model.path} is {kind} but dataset {dataset.name} is "
                            f"{'text' if dataset.is_text else 'images'}")
    offered = set(dataset.x.arrays)
    missing = [name for name in model.input_names if name not in offered]
    unexpected = sorted(offered - set(model.input_names)) if dataset.x.texts is None else []
    if missing or unexpected:
        problems = ([f"no data for model input(s) {', '.join(missing)}"] * bool(missing)
                    + [f"{', '.join(unexpected)} match(es) no model input"] * bool(unexpected))
        raise PtqauditError(f"dataset {dataset.name}: {'; '.join(problems)}; the model's inputs are "
                            f"{', '.join(model.input_names)} and the data has {', '.join(sorted(offered))}")
    limits = model.token_limits
    for name, (rows, table) in limits.vocabulary.items():
        ids = dataset.x.arrays[name]
        if ids.size and (ids.max() >= rows or ids.min() < 0):
            bad = int(ids.max()) if ids.max() >= rows else int(ids.min())
            raise PtqauditError(f"dataset {dataset.name}: input {name} holds token id {bad}, outside the model's "
                                f"embedding table {table!r} of {rows} rows (ids 0..{rows - 1}): is --tokenizer the "
                                "model's own?")
    if limits.positions is not None and dataset.x.sequence_length > limits.positions[0]:
        rows, table = limits.positions
        longest = int(dataset.x.lengths.max())
        raise PtqauditError(f"dataset {dataset.name}: sequences of {dataset.x.sequence_length} tokens (longest "
                            f"sentence {longest}) but the model's position table {table!r} has {rows} rows: "
                            f"run with --max-length {rows} or less")


ENGINES = ("ort", "sim", "both")


class KernelEngines:
    """Predictions of one model under any kernel family: ORT's own kernels for this machine's family, the
    simulator's emulation of the family's integer arithmetic for another (one simulator per family)."""

    def __init__(self, model: LoadedModel, device: str = "cpu", threads: int = 0):
        self.model, self.device, self.threads = model, device, threads
        self.native = detect_kernel_family()
        self._sims: dict[str, SimModel] = {}

    def sim(self, family: str) -> SimModel:
        if family not in self._sims:
            self._sims[family] = SimModel(self.model, kernel_family=family, ort_threads=self.threads).eval()
        return self._sims[family]

    def predict(self, policy: ResolvedPolicy | None, family: str, dataset: Dataset, batch_size: int, desc: str,
                progress: bool = True) -> Predictions:
        """Logits of `policy` (None: FP32, which runs no integer kernel) under `family`."""
        if family != self.native:
            return sim_predict(self.sim(family), dataset, policy, batch_size, f"{desc} ({family}, emulated)", progress)
        graph = quantize(self.model, policy) if policy is not None else self.model.proto
        return predict(make_session(graph, self.device, self.threads), dataset, batch_size, desc, progress,
                       str(self.model.path))


@dataclass
class SimCheck:
    """The simulator's run beside ORT's on the same inputs (engine "both")."""

    accuracy: float
    images_per_second: float
    top1_agreement_with_ort: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float

    @classmethod
    def compare(cls, ort_run: Predictions, sim_run: Predictions, labels: np.ndarray) -> "SimCheck":
        agreement = EngineAgreement.between(ort_run, sim_run)
        return cls(accuracy(sim_run.labels, labels), sim_run.images_per_second(), agreement.top1_agreement,
                   agreement.max_abs_logit_diff, agreement.mean_abs_logit_diff)


@dataclass
class PolicyResult:
    policy: str
    description: str
    method: str  # which graph builder made the quantized ORT model, or "simulator"
    layers: str  # settings used, e.g. "W4A8 x18, W8A8 x2"
    digest: str
    accuracy: float
    drop_points: float  # FP32 accuracy minus this accuracy, in percentage points
    agreement_with_fp32: float  # fraction of inputs with the same top-1 class as FP32
    bitops: int  # per input sample
    effective_bits: float
    images_per_second: float
    sim: SimCheck | None = None
    kernel_family: str = ""  # the integer arithmetic these numbers are of (ptqaudit.kernels)
    source: str = "ORT"  # ORT (its own kernels), simulator (--engine sim), emulated (another family's arithmetic)


@dataclass
class EvalReport:
    model: str
    dataset: str
    images: int
    batch_size: int
    engine: str  # "ort" (numbers from ONNX Runtime), "sim" (from the simulator), "both" (ORT, sim checked)
    runtime: str
    kernel_family: str  # the integer arithmetic of this CPU's ORT kernels (ptqaudit.kernels)
    device: str
    fp32_accuracy: float
    fp32_images_per_second: float
    fp32_bitops: int
    fp32_sim: SimCheck | None = None
    kernels: list[str] = field(default_factory=list)  # the fleet: the families every policy is measured under
    results: list[PolicyResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def shows_kernels(self) -> bool:
        """Whether the table needs a kernels column: some numbers are not of this machine's family."""
        return self.kernels not in ([], [self.kernel_family])

    def columns(self) -> list[tuple[str, int | None]]:
        return (EVAL_COLUMNS[:1] + [KERNELS_COLUMN] * self.shows_kernels + EVAL_COLUMNS[1:]
                + SIM_COLUMNS * (self.engine == "both"))

    def rows(self) -> list[list[str]]:
        """The eval table's rows so far (fp32, then each policy), as the terminal shows them (see table_line)."""
        both, kernels = self.engine == "both", self.shows_kernels
        rows = [["fp32"] + ["-"] * kernels + [f"{100 * self.fp32_accuracy:.2f}%", "", "", _si(self.fp32_bitops), "32.00",
                 f"{self.fp32_images_per_second:,.0f}"] + (_sim_cells(self.fp32_sim) if both else []) + ["-"]]
        for r in self.results:
            rows.append([r.policy] + [f"{r.kernel_family} ({r.source})"] * kernels
                        + [f"{100 * r.accuracy:.2f}%", f"{r.drop_points:+.2f}", f"{100 * r.agreement_with_fp32:.2f}%",
                           _si(r.bitops), f"{r.effective_bits:.2f}", f"{r.images_per_second:,.0f}"]
                        + (_sim_cells(r.sim) if both else []) + [r.method])
        return rows

    def gate(self, gate: Gate) -> list[Check]:
        """The gate applied to every policy under every family (GateFailed naming each failure), else its checks."""
        failures, checks = [], []
        for r in self.results:
            subject = f"{r.policy} on {r.kernel_family} kernels ({r.source})"
            failure = gate.failure(self.fp32_accuracy, r.accuracy, subject)
            if failure is not None:
                failures.append(failure)
            checks += gate.checks(self.fp32_accuracy, r.accuracy, subject)
        if failures:
            raise GateFailed("gate failed: " + "; ".join(f.removeprefix("gate failed: ") for f in failures))
        return checks


EVAL_COLUMNS = [("policy", None), ("accuracy", 9), ("drop (pts)", 10), ("agree w/ fp32", 13), ("BitOPs/img", 10),
                ("eff. bits", 9), ("images/s", 9)]
KERNELS_COLUMN = ("kernels", 20)  # with a fleet (--kernels): the family and where its numbers come from
SIM_COLUMNS = [("sim = ort", 9), ("sim img/s", 9)]  # with --engine both: top-1 agreement and simulator speed


def table_line(cells: list[str], columns: list, policy_width: int) -> str:
    """One row of the eval table at fixed widths, so rows can be printed as each policy finishes."""
    out = [cells[0].ljust(policy_width)]
    out += [c.rjust(w) for c, (_, w) in zip(cells[1:-1], columns[1:])]
    return "  ".join(out + [cells[-1]]).rstrip()


def _si(value: float) -> str:
    """A large count in engineering notation: 2.60G, 41.0M."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _sim_cells(check: SimCheck | None) -> list[str]:
    return [f"{100 * check.top1_agreement_with_ort:.2f}%", f"{check.images_per_second:,.0f}"] if check else ["", ""]


def runtime_description() -> str:
    return f"onnxruntime {ort.__version__} on {platform.machine()} (integer kernels: {detect_kernel_family()})"


def evaluate(
    model: LoadedModel,
    dataset: Dataset,
    policies: list[Policy],
    batch_size: int = 1,
    engine: str = "ort",
    device: str = "cpu",
    threads: int = 0,
    progress: bool = True,
    on_update=None,
    kernels: tuple[str, ...] = (),
) -> EvalReport:
    """FP32 accuracy, then accuracy, drop, FP32 agreement, cost and speed of each policy: on ORT's
    kernels (engine "ort"), on the simulator ("sim"), or on ORT with the simulator's agreement ("both").
    kernels: the fleet of kernel families to measure each policy under (empty: this machine's); a family
    other than this machine's is measured by the simulator's emulation of it, and labelled so.
    on_update(report) is called after FP32 and after each policy, so a CLI can print results as they come."""
    if engine not in ENGINES:
        raise PtqauditError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if batch_size < 1:
        raise PtqauditError(f"--batch-size must be at least 1, got {batch_size}")
    check_model_fits_data(model, dataset, batch_size)
    resolved = [policy.resolve(model.layers) for policy in policies]  # every policy checked before any long run
    engines = KernelEngines(model, device, threads)
    native = engines.native
    kernels = tuple(kernels) or (native,)

    def run(policy: ResolvedPolicy | None, label: str, family: str) -> tuple[Predictions, SimCheck | None, str, str]:
        """(primary predictions, simulator check, graph builder, source) for one policy (None: FP32)."""
        if family != native:
            return engines.predict(policy, family, dataset, batch_size, label, progress), None, "simulator", "emulated"
        if engine == "sim":
            return (sim_predict(engines.sim(family), dataset, policy, batch_size, f"{label} (sim)", progress), None,
                    "simulator", "simulator")
        quantized = quantize(model, policy) if policy is not None else None
        ort_run = predict(make_session(quantized or model.proto, device, threads), dataset, batch_size, label, progress,
                          str(model.path))
        check = None
        if engine == "both":
            sim_run = sim_predict(engines.sim(family), dataset, policy, batch_size, f"{label} (sim)", progress)
            check = SimCheck.compare(ort_run, sim_run, dataset.y)
        return ort_run, check, quantized.method if quantized else "-", "ORT"

    # fp32 runs no integer kernel: any family's engine gives it; ORT's where the machine's family is wanted
    fp32, fp32_check, _, _ = run(None, "fp32", native if native in kernels or engine != "ort" else kernels[0])
    fp32_accuracy = accuracy(fp32.labels, dataset.y)
    report = EvalReport(
        model=str(model.path), dataset=dataset.name, images=len(dataset), batch_size=batch_size, engine=engine,
        runtime=runtime_description(), kernel_family=native, device=device, fp32_accuracy=fp32_accuracy,
        fp32_images_per_second=fp32.images_per_second(), fp32_bitops=bitops_of(model.total_macs, FP32_BITS, FP32_BITS),
        fp32_sim=fp32_check, kernels=list(kernels),
    )
    if on_update:
        on_update(report)
    for policy, applied in zip(policies, resolved):
        for family in kernels:
            predictions, check, method, source = run(applied, policy.name, family)
            policy_accuracy = accuracy(predictions.labels, dataset.y)
            report.results.append(PolicyResult(
                policy=policy.name, description=policy.description, method=method,
                layers=applied.summary(), digest=applied.digest, accuracy=policy_accuracy,
                drop_points=drop_points(fp32_accuracy, policy_accuracy),
                agreement_with_fp32=accuracy(predictions.labels, fp32.labels),
                bitops=applied.bitops(model.layers), effective_bits=applied.effective_bits(model.layers),
                images_per_second=predictions.images_per_second(), sim=check, kernel_family=family, source=source,
            ))
            if on_update:
                on_update(report)
    return report
