"""`ptqaudit search`: find the worst and best static policies within a budget with the simulator, then
measure the top candidates on ONNX Runtime's kernels and write everything to a run folder."""

from __future__ import annotations

import fnmatch
import io
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import yaml

from ..data import DataConfig, Dataset, load_dataset
from ..errors import PtqauditError
from ..evaluate import check_model_fits_data, make_session, predict
from ..kernels import KERNEL_FAMILIES, detect_kernel_family, kernel_source
from ..onnx_graph import LoadedModel, load_model
from ..policy import load_policy, policy_file_dict
from ..predictions import accuracy, drop_points
from ..progress import Progress
from ..runs import (SEARCH_SUMMARY, RunFolder, check_fields, check_schema_version, dataclass_from_dict, input_identity,
                    setting_defaults, typed_from_dict, without_none, write_atomic, write_json)
from ..sim.engine import EngineAgreement
from ..sim.model import SimModel, prepare_device
from ..text import table
from ..workers import EvaluationPool, Request, SimRequest, WorkerSettings
from .dynamic import dynamic_policy
from .evaluator import Candidate, Leaderboard, SimEvaluator
from .methods import METHODS, SEARCHES
from .sensitivity import GRADIENT_IMAGES, SENSITIVITY_METHODS, gradient_sensitivity, probe_sensitivity
from .space import OBJECTIVES, Budget, Objective, SearchSpace, check_bits, layer_features


@dataclass
class SearchConfig:
    """Every setting of a search; stored in run.json and compared on --resume."""

    model: str
    data: DataConfig
    output: str
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    budget_avg_bits: float | None = 6.0
    budget_bitops: int | None = None
    objective: str = "both"
    method: str = "rl"
    max_evaluations: int = 400
    base_policy: str = "w8a8"
    layers: tuple[str, ...] = ()
    batch_size: int = 1
    search_limit: int = 1000
    search_split: str | None = None  # score candidates on this split (None: the evaluation data itself)
    verify_top: int = 3
    seed: int = 0
    dynamic: bool = False  # also train a router choosing among the verified candidates per input
    kernels: tuple[str, ...] = ()  # the fleet's kernel families (ptqaudit.kernels); empty: this machine's
    sensitivity: str = "gradient"  # how the RL search's prior is estimated (search.sensitivity)
    optimize: str = ""  # the transformer model type the model is fused for first (onnx_graph.optimize_transformer)
    device: str = "cpu"  # where the simulator scores policies (ORT's numbers come from the CPU's kernels)

    @property
    def fleet(self) -> tuple[str, ...]:
        return self.kernels or (detect_kernel_family(),)

    def validate(self) -> None:
        check_bits(self.bits)
        unknown = [name for name in self.kernels if name not in KERNEL_FAMILIES]
        if unknown:
            raise PtqauditError(f"--kernels: unknown kernel family {unknown[0][:40]!r}; expected {', '.join(KERNEL_FAMILIES)}")
        if self.dynamic and self.fleet != (detect_kernel_family(),):
            raise PtqauditError("--dynamic routes inputs on this machine's kernels only: drop --kernels or --dynamic")
        if self.objective not in OBJECTIVES + ("both",):
            raise PtqauditError(f"--objective must be worst, best or both, got {self.objective!r}")
        if self.sensitivity not in SENSITIVITY_METHODS:
            raise PtqauditError(f"--sensitivity must be one of {', '.join(SENSITIVITY_METHODS)}, got {self.sensitivity!r}")
        if self.method not in METHODS:
            raise PtqauditError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if (self.budget_avg_bits is None) == (self.budget_bitops is None):
            raise PtqauditError("give exactly one of --budget-avg-bits and --budget-bitops")
        for name in ("max_evaluations", "batch_size", "search_limit", "verify_top"):
            if getattr(self, name) < 1:
                raise PtqauditError(f"--{name.replace('_', '-')} must be at least 1")
        if self.device not in SIM_DEVICES:
            raise PtqauditError(f"--device must be one of {', '.join(SIM_DEVICES)}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise PtqauditError("--device cuda: torch sees no CUDA device (is a CUDA build of torch installed?)")
        if self.dynamic and self.verify_top < 2:
            raise PtqauditError("--dynamic routes inputs among the verified candidates: it needs --verify-top 2 or more")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["bits"], values["layers"], values["kernels"] = list(self.bits), list(self.layers), list(self.kernels)
        values["data"] = self.data.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "SearchConfig":
        """The config to_dict wrote (run.json's "config", checked by runs.SEARCH_RUN_FILE). A run written before
        --sensitivity existed probed."""
        return dataclass_from_dict(cls, {"sensitivity": "probes", **values}, data=DataConfig)


@dataclass
class Verified:
    """One candidate policy measured on ORT over the whole evaluation set."""

    rank: int
    digest: str
    ort_accuracy: float
    sim_accuracy_search_subset: float
    sim_top1_agreement_with_ort: float
    bitops: int
    effective_bits: float
    layers: dict = field(default_factory=dict)
    kernels: dict[str, float] = field(default_factory=dict)  # accuracy under each family of the fleet

    @property
    def accuracy(self) -> float:
        """The fleet's worst: the lowest accuracy over its kernel families (ORT's here without a fleet)."""
        return min(self.kernels.values()) if self.kernels else self.ort_accuracy


@dataclass
class UniformBaseline:
    """The most extreme uniform policy inside the budget (every searched layer at one weight and one
    activation width), measured on ORT beside the candidates: the case reported is never less extreme."""

    label: str  # e.g. "W6A6"
    digest: str
    ort_accuracy: float
    accuracy: float  # the fleet's lowest (ORT's here without a fleet)


SUMMARY_VERSION = 1  # the layout of summary.json; a reader refuses another
EVALUATION_DATA = "evaluation"  # the evaluation data's key in the search's worker pool
SEARCH_DATA = "search"  # the key of the examples candidates are scored on
SIM_DEVICES = ("cpu", "cuda")


@dataclass(kw_only=True)
class SearchCase:
    """One objective's result: the leading candidate, measured on ORT, and every verified candidate."""

    ort_accuracy: float  # on ORT's kernels of this machine
    drop_points: float  # fp32 minus `accuracy`
    policy_file: str
    evaluations: int
    policy: dict[str, str]  # layer name -> setting label
    candidates: list[Verified]
    dynamic: dict | None = None  # the router's numbers (--dynamic)
    kernels: dict[str, float] = field(default_factory=dict)  # accuracy under each family of the fleet
    uniform: UniformBaseline | None = None
    sensitivity_evaluations: int = 0  # of `evaluations`, those the probes took (--sensitivity probes)

    @property
    def accuracy(self) -> float:
        """What the gate holds: the lowest accuracy over the fleet's kernel families (ORT's without one)."""
        return min(self.kernels.values()) if self.kernels else self.ort_accuracy


@dataclass(kw_only=True)
class SearchSummary:
    """A search's results, as summary.json holds them (its keys are these fields)."""

    schema_version: int = SUMMARY_VERSION
    kind: str = "search"
    model: str = ""
    dataset: str
    images: int
    search_dataset: str = ""
    search_images: int = 0
    batch_size: int
    seed: int = 0
    method: str
    budget: dict  # bitops, effective_bits, and what each case is held to
    bits: list[int]
    searched_layers: list[str] = field(default_factory=list)
    base_policy: str = SearchConfig.base_policy
    fp32_accuracy: float
    search_seconds: float = 0.0
    numbers: str = ""
    worst: SearchCase | None = None
    best: SearchCase | None = None
    spread_points: float | None = None  # best minus worst, in points, when both were searched
    total_seconds: float = 0.0
    kernel_family: str = ""  # this machine's: ORT's numbers are of it
    kernels: dict[str, str] = field(default_factory=dict)  # the fleet: family -> where its numbers come from

    def case(self, objective: Objective) -> SearchCase | None:
        return getattr(self, str(objective))

    @property
    def cases(self) -> list[SearchCase]:
        return [case for case in (self.worst, self.best) if case is not None]

    def table(self) -> str:
        """The terminal summary: fp32, each case (and its router) on ORT, and the spread between them."""
        rows = [["fp32", f"{100 * self.fp32_accuracy:.2f}%", "", "", "", ""]]
        for objective in OBJECTIVES:
            case = self.case(objective)
            if case is None:
                continue
            top = case.candidates[0]
            rows.append([f"{objective} case", f"{100 * case.ort_accuracy:.2f}%", f"{case.drop_points:+.2f}",
                         f"{top.effective_bits:.2f}", f"{100 * top.sim_top1_agreement_with_ort:.2f}%",
                         f"{case.evaluations}"])
            if self.shows_kernels:
                rows[-1][1:3] = [f"{100 * case.accuracy:.2f}% (fleet)", f"{case.drop_points:+.2f}"]
                rows += [[f"  {family} ({self.kernels[family]})", f"{100 * accuracy:.2f}%",
                          f"{drop_points(self.fp32_accuracy, accuracy):+.2f}", "", "", ""]
                         for family, accuracy in case.kernels.items()]
            if case.uniform is not None:
                rows.append([f"  {objective} uniform ({case.uniform.label})", f"{100 * case.uniform.accuracy:.2f}%",
                             f"{drop_points(self.fp32_accuracy, case.uniform.accuracy):+.2f}", "", "", ""])
            if case.dynamic is not None:
                dyn = case.dynamic
                rows.append([f"{objective} dynamic", f"{100 * dyn['ort_accuracy']:.2f}%", f"{dyn['drop_points']:+.2f}",
                             "", "", f"{len(dyn['menu'])} policies"])
        accuracy_header = "accuracy" if self.shows_kernels else "ORT accuracy"
        text = table(["", accuracy_header, "drop (pts)", "eff. bits", "sim = ort", "evaluated"], rows, right={1, 2, 3, 4, 5})
        if self.shows_kernels:
            text += ("\n\nfleet: the lowest accuracy over the kernel families, which the gate holds; ORT's own kernels "
                     f"measure this machine's ({self.kernel_family}), the simulator emulates the others")
        if any(case.uniform is not None for case in self.cases):
            text += ("\n\nuniform: the most extreme policy inside the budget with one weight and one activation width "
                     "for every searched layer; a case is never less extreme")
        if self.spread_points is not None:
            text += f"\n\nspread between best and worst case: {self.spread_points:.2f} points"
        return text

    @property
    def shows_kernels(self) -> bool:
        """Whether numbers are given per kernel family: the fleet is more than this machine's family."""
        return list(self.kernels) not in ([], [self.kernel_family])

    def to_dict(self) -> dict:
        """summary.json's content: optional results that are absent (None, or no fleet) are left out."""
        values = _without_empty(without_none(asdict(self), ("worst", "best", "spread_points")), ("kernel_family", "kernels"))
        for objective in OBJECTIVES:
            if objective in values:
                case = _without_empty(without_none(values[objective], ("dynamic", "uniform")), ("kernels",))
                if not case["sensitivity_evaluations"]:  # no probes (the gradient prior, or no RL)
                    del case["sensitivity_evaluations"]
                case["candidates"] = [_without_empty(c, ("kernels",)) for c in case["candidates"]]
                values[objective] = case
        return values

    @classmethod
    def from_dict(cls, values, where: str | Path) -> "SearchSummary":
        """A summary.json read back: its version and fields checked (PtqauditError naming `where` and the field)."""
        check_schema_version(values, where, SUMMARY_VERSION)
        check_fields(values, SEARCH_SUMMARY, where)
        return typed_from_dict(cls, values)


def _without_empty(values: dict, keys) -> dict:
    """values less the `keys` that hold an empty string, list or dict."""
    return {key: value for key, value in values.items() if not (key in keys and value in ("", {}, []))}


def searched_layers(model: LoadedModel, globs: tuple[str, ...] = ()) -> list[str]:
    """The layers matching --layers (default: all) that cost BitOPs: an embedding lookup costs none, so a
    budget could not hold it back and it keeps the base policy's setting."""
    computing = [layer for layer in model.layers if not layer.kind.weight_only]
    if not globs:
        return [layer.name for layer in computing]
    names = [layer.name for layer in computing if any(fnmatch.fnmatchcase(layer.name, g) for g in globs)]
    if not names:
        raise PtqauditError(f"--layers {', '.join(globs)} matches no layer (`ptqaudit layers MODEL` lists them)")
    return names


def load_search_inputs(config: SearchConfig) -> tuple[LoadedModel, Dataset, Dataset | None]:
    """The model, the evaluation data, and the data candidates are scored on when --search-split names
    another split (else None: a subset of the evaluation data)."""
    dataset = load_dataset(config.data)
    model = load_model(config.model, dataset.x.shape[1:], config.optimize)  # the data gives the symbolic dims
    search_data = None
    if config.search_split is not None and config.search_split != config.data.split:
        # only the examples the search scores are kept: a limit on the evaluation data does not apply
        search_data = load_dataset(replace(config.data, split=config.search_split, limit=config.search_limit))
    return model, dataset, search_data


def run_search(config: SearchConfig, model: LoadedModel, dataset: Dataset, resume: bool = False,
               progress: bool = True, echo=print, search_data: Dataset | None = None,
               workers: WorkerSettings = WorkerSettings()) -> SearchSummary:
    """Search, verify on ORT, write the run folder; returns the summary (also in summary.json).
    search_data: where candidates are scored (the --search-split), else a subset of `dataset`. The ORT
    verification runs on `workers` (the same numbers for any number of them)."""
    config.validate()
    check_model_fits_data(model, dataset, config.batch_size)
    base = load_policy(config.base_policy).resolve(model.layers)
    space = SearchSpace(model.layers, base, config.bits, searched_layers(model, config.layers),
                        Budget(config.budget_bitops) if config.budget_bitops is not None else config.budget_avg_bits)
    budget = space.budget
    objectives = OBJECTIVES if config.objective == "both" else (Objective(config.objective),)
    for objective in objectives:
        space.check_budget(objective)

    folder = RunFolder(config.output)
    inputs = input_identity(model.path, [d for d in (dataset, search_data) if d is not None])
    with folder.start(config.to_dict(), resume, inputs, echo, setting_defaults(SearchConfig)):
        return _search(config, model, dataset, search_data, folder, space, budget, objectives, resume, progress, echo,
                       workers)


def _search(config: SearchConfig, model: LoadedModel, dataset: Dataset, search_data: Dataset | None,
            folder: RunFolder, space: SearchSpace, budget: Budget, objectives: tuple[Objective, ...], resume: bool,
            progress: bool, echo, workers: WorkerSettings) -> SearchSummary:
    """Search, verify and write the results: run_search's work, done while it holds the run folder."""
    memo = {r["digest"]: r["sim_accuracy"] for r in folder.read_trace()} if resume else {}
    if memo:
        echo(f"resuming {config.output}: {len(memo)} evaluations already in its trace are replayed, not recomputed")

    started = time.perf_counter()
    native = detect_kernel_family()
    prepare_device(config.device)
    # the ORT sessions' thread setting is reproduced (an LSTM's arithmetic depends on it), as the workers do
    sims = {family: SimModel(model, kernel_family=family, ort_threads=workers.threads).eval().to(config.device)
            for family in dict.fromkeys((native, *config.fleet))}
    sim = sims[native]  # this machine's arithmetic: its agreement with ORT is measured
    search_set = (search_data if search_data is not None else dataset).subset(config.search_limit)
    fleet = "" if config.fleet == (native,) else f" | kernels {', '.join(config.fleet)} (score: the lowest)"
    echo(f"model {config.model} | data {dataset.name}, {len(dataset)} {dataset.unit} (search on {len(search_set)} of "
         f"{search_set.name}) | {dataset.padding_note}batch size {config.batch_size} | budget "
         f"{budget.effective_bits(space.macs):.2f} effective bits over {len(space.searched)} searched layers | "
         f"{config.method}, seed {config.seed}{fleet}" + (f"\n{model.unaudited_note}" if model.unaudited_note else ""))
    features = layer_features(space.searched, [sim.weight_array(layer.name) for layer in space.searched])
    datasets = {EVALUATION_DATA: dataset, SEARCH_DATA: search_set}
    with EvaluationPool(model, datasets, workers, sims) as pool:
        # the simulator's groups of policies go to the workers too, unless it runs on a GPU
        evaluator = SimEvaluator([sims[family] for family in config.fleet], search_set, config.batch_size, space,
                                 folder.append_trace, memo, (pool, SEARCH_DATA) if config.device == "cpu" else None)
        sensitivity = None
        if config.method == "rl" and config.sensitivity == "gradient":
            images = min(GRADIENT_IMAGES, len(search_set))
            echo(f"estimating each operand's sensitivity from the simulator's gradients on {images} {dataset.unit} "
                 "(no policy evaluations)")
            sensitivity = gradient_sensitivity(space, sim, search_set, config.batch_size)

        echo(f"measuring fp32 on ORT ({len(dataset)} {dataset.unit})")
        fp32 = predict(make_session(model.proto), dataset, config.batch_size, "fp32 (ORT)", progress)
        fp32_accuracy = accuracy(fp32.labels, dataset.y)
        summary = SearchSummary(
            model=config.model, dataset=dataset.name, images=len(dataset), search_dataset=search_set.name,
            search_images=len(search_set), batch_size=config.batch_size, seed=config.seed, method=config.method,
            budget={"bitops": budget.bitops, "effective_bits": budget.effective_bits(space.macs),
                    "worst": "policies at or above it", "best": "policies at or below it"},
            bits=list(space.bits), searched_layers=[layer.name for layer in space.searched],
            base_policy=config.base_policy, fp32_accuracy=fp32_accuracy,
            numbers="accuracies are ONNX Runtime's on the whole evaluation set; sim_* are the simulator's; per kernel "
                    "family, this machine's is ORT's and the others the simulator's emulation",
            kernel_family=native, kernels={family: kernel_source(family) for family in config.fleet},
        )
        context = _Context(config, model, dataset, search_set, space, sims, folder, progress, pool)
        return _search_and_verify(context, summary, objectives, evaluator, features, sensitivity, started, echo)


def _search_and_verify(context: "_Context", summary: SearchSummary, objectives, evaluator: SimEvaluator, features,
                       sensitivity, started: float, echo) -> SearchSummary:
    """Each objective's search, then its verification on ORT; summary.json written after each."""
    config, folder = context.config, context.folder
    failures = []
    for objective in objectives:
        searching = time.perf_counter()
        board, uniform, probe_evaluations = _search_objective(context, evaluator, objective, features, sensitivity, echo)
        summary.search_seconds += time.perf_counter() - searching
        if not board.entries:
            failures.append(f"the {config.method} search found no {objective}-case policy within the budget in "
                            f"{evaluator.evaluations} evaluations")
            continue
        setattr(summary, objective.value, _verified_case(context, summary, board, uniform, objective,
                                                          evaluator.evaluations, probe_evaluations, echo))
        if summary.worst is not None and summary.best is not None:
            summary.spread_points = drop_points(summary.best.accuracy, summary.worst.accuracy)
        summary.total_seconds = time.perf_counter() - started
        write_json(folder.path / "summary.json", summary.to_dict())  # each case is kept as soon as it is known
    if failures:
        kept = [str(case_objective) for case_objective in objectives if summary.case(case_objective) is not None]
        kept_note = f"; the {kept[0]} case is in {folder.path / 'summary.json'}" if kept else ""
        raise PtqauditError(f"{'; '.join(failures)}{kept_note}; raise --max-evaluations")
    return summary


def _search_objective(context: "_Context", evaluator: SimEvaluator, objective: Objective, features, sensitivity,
                      echo) -> tuple[Leaderboard, Candidate | None, int]:
    """One objective's search: the uniform policies on the budget's edge first (cheap, inside the budget, and
    what a user compares with), then the method. Returns the leaderboard, the most extreme uniform policy
    scored (None if the cap left none), and the evaluations the sensitivity probes took (--sensitivity probes)."""
    config, space = context.config, context.space
    board = Leaderboard(objective, config.verify_top)
    evaluator.start_count(config.max_evaluations)
    scope = ("every policy the budget admits" if config.method == "exhaustive"
             else f"up to {config.max_evaluations} policies")
    echo(f"searching the {objective} case: {config.method}, {scope} scored by the simulator on "
         f"{len(context.search_set)} {context.dataset.unit}")
    bar = Progress(config.max_evaluations, f"{config.method} search, {objective} case", "policy", context.progress)

    def show(done: int, best: float | None, total: int | None = None) -> None:
        if total is not None:  # a method that knows how many policies it will score (exhaustive)
            bar.total = total
        bar.update(done - bar.n)
        if best is not None:
            bar.set_postfix_str(f"{objective} sim accuracy {100 * best:.2f}%")

    frontier = space.uniform_frontier(objective)
    scored = evaluator.accuracies(frontier, objective, "uniform")
    board.offer(space, frontier[: len(scored)], scored)
    uniform = None
    if scored:
        index = objective.pick(range(len(scored)), lambda i: scored[i])
        uniform = board.candidate(space, frontier[index], scored[index])
    probe_evaluations = 0
    if config.method == "rl" and config.sensitivity == "probes":  # they count against the cap
        before = evaluator.evaluations
        sensitivity = probe_sensitivity(space, evaluator, objective, board)
        probe_evaluations = evaluator.evaluations - before
    SEARCHES[config.method](space=space, evaluator=evaluator, board=board, objective=objective,
                            max_evaluations=config.max_evaluations, seed=config.seed, features=features,
                            progress=show, sensitivity=sensitivity, start=None if uniform is None else uniform.choice)
    bar.close()
    return board, uniform, probe_evaluations


def _verified_case(context: "_Context", summary: SearchSummary, board: Leaderboard, uniform: Candidate | None,
                   objective: Objective, evaluations: int, probe_evaluations: int, echo) -> SearchCase:
    """Measure the leading candidates (and the most extreme uniform policy, if it is not among them) on ORT,
    write the case's policy file, and return the case ranked by the fleet's lowest accuracy."""
    config, space, model, folder = context.config, context.space, context.model, context.folder
    candidates = {c.digest: c for c in board.ranked}
    if uniform is not None:
        candidates.setdefault(uniform.digest, uniform)
    count = len(candidates)
    echo(f"verifying {count} {objective}-case candidate{'s' * (count != 1)} on ORT and the simulator "
         f"({len(context.dataset)} {context.dataset.unit} each)")
    verified = _verify(context, list(candidates.values()), objective)
    chosen = verified[0]
    policy = space.policy(candidates[chosen.digest].choice, f"{objective}-case")
    budget_bits = summary.budget["effective_bits"]
    description = (f"{objective} case found by {config.method} search of {model.path.name} within "
                   f"{budget_bits:.2f} effective bits: {100 * chosen.ort_accuracy:.2f}% on ORT"
                   + (f", {100 * chosen.accuracy:.2f}% on its kernel fleet" if summary.shows_kernels else ""))
    write_atomic(folder.path / f"{objective}.yaml", yaml.safe_dump(policy_file_dict(policy, description), sort_keys=False))
    case = SearchCase(ort_accuracy=chosen.ort_accuracy, drop_points=drop_points(summary.fp32_accuracy, chosen.accuracy),
                      policy_file=f"{objective}.yaml", evaluations=evaluations, policy=chosen.layers,
                      candidates=verified, kernels=chosen.kernels, sensitivity_evaluations=probe_evaluations)
    if uniform is not None:
        measured = next(v for v in verified if v.digest == uniform.digest)
        case.uniform = UniformBaseline(space.uniform_label(uniform.choice), uniform.digest, measured.ort_accuracy,
                                       measured.accuracy)
    if config.dynamic:
        echo(f"training the {objective}-case router on the simulator, then routing {len(context.dataset)} {context.dataset.unit} on ORT")
        case.dynamic = _dynamic(context, candidates, verified, objective, summary.fp32_accuracy)
    return case


@dataclass
class _Context:
    """What the verification and routing steps of one search share."""

    config: SearchConfig
    model: LoadedModel
    dataset: Dataset  # the evaluation data, measured on ORT
    search_set: Dataset  # the images the simulator scores policies on
    space: SearchSpace
    sims: dict[str, SimModel]  # per kernel family: this machine's and the fleet's
    folder: RunFolder
    progress: bool
    pool: EvaluationPool  # the ORT evaluations, on the workers asked for

    @property
    def sim(self) -> SimModel:
        """The simulator of this machine's arithmetic, which ORT's numbers are compared with."""
        return self.sims[detect_kernel_family()]


def _dynamic(context: _Context, candidates: dict[str, Candidate], verified: list[Verified], objective: Objective,
             fp32_accuracy: float) -> dict:
    """The router over the verified candidates, its files (menu policies, weights) and numbers."""
    config, folder = context.config, context.folder
    menu = [context.space.policy(candidates[v.digest].choice, f"{objective}-menu-{v.rank}") for v in verified]
    router, result = dynamic_policy(context.model, context.sim, context.search_set, context.dataset, menu, objective,
                                    config.batch_size, config.seed, context.progress)
    for v, policy in zip(verified, menu):
        write_atomic(folder.path / f"{objective}-menu-{v.rank}.yaml", yaml.safe_dump(policy_file_dict(
            policy, f"{objective}-case menu entry {v.rank} of the dynamic policy"), sort_keys=False))
    buffer = io.BytesIO()
    torch.save({"state_dict": router.state_dict(), "menu": [f"{objective}-menu-{v.rank}.yaml" for v in verified],
                "per_batch": config.batch_size > 1}, buffer)
    write_atomic(folder.path / f"{objective}-router.pt", buffer.getvalue())
    return {**asdict(result), "drop_points": drop_points(fp32_accuracy, result.ort_accuracy),
            "router_file": f"{objective}-router.pt", "routing": "per batch" if config.batch_size > 1 else "per input"}


def _verify(context: _Context, candidates: list[Candidate], objective: Objective) -> list[Verified]:
    """ORT accuracy of each leading candidate on the whole evaluation set, and its accuracy under every
    kernel family of the fleet (this machine's: ORT's; the others: the simulator's emulation); ranked by
    the fleet's lowest."""
    dataset, batch_size = context.dataset, context.config.batch_size
    native = detect_kernel_family()
    policies = [context.space.policy(candidate.choice, f"{objective}-candidate") for candidate in candidates]
    # each policy on ORT, and on the simulator of every kernel family the summary shows (this machine's for the
    # agreement with ORT, the fleet's others emulated), all on the pool at once
    families = [native] + [family for family in context.config.fleet if family != native]
    requests = [Request(policy, EVALUATION_DATA, batch_size) for policy in policies]
    requests += [SimRequest((policy,), EVALUATION_DATA, batch_size, family) for family in families for policy in policies]
    runs = context.pool.predict(requests, f"verify {objective}", context.progress, "evaluation")
    ort_runs = runs[:len(policies)]
    sim_runs = {family: [run for (run,) in runs[len(policies) * (f + 1):len(policies) * (f + 2)]]
                for f, family in enumerate(families)}
    results = []
    for index, (candidate, policy, ort_run) in enumerate(zip(candidates, policies, ort_runs)):
        ort_accuracy = accuracy(ort_run.labels, dataset.y)
        kernels = {}
        if context.config.fleet != (native,):
            kernels = {family: ort_accuracy if family == native else accuracy(sim_runs[family][index].labels, dataset.y)
                       for family in context.config.fleet}
        results.append(Verified(
            rank=0, digest=candidate.digest, ort_accuracy=ort_accuracy,
            sim_accuracy_search_subset=candidate.sim_accuracy,
            sim_top1_agreement_with_ort=EngineAgreement.between(ort_run, sim_runs[native][index]).top1_agreement,
            bitops=candidate.bitops, effective_bits=context.space.effective_bits(candidate.bitops),
            layers={name: (q.label if q else "fp32") for name, q in policy.mapping.items()}, kernels=kernels,
        ))
    results.sort(key=lambda v: objective.key(v.accuracy))
    for rank, result in enumerate(results, 1):
        result.rank = rank
    return results
