"""`ptqaudit search`: find the worst and best static policies within a budget with the simulator, then
measure the top candidates on ONNX Runtime's kernels and write everything to a run folder."""

from __future__ import annotations

import fnmatch
import io
import time
from dataclasses import asdict, dataclass, field

import torch
import yaml

from ..data import DataConfig, Dataset
from ..errors import PtqauditError
from ..evaluate import check_model_fits_data, make_session, predict
from ..onnx_graph import LoadedModel
from ..policy import MAX_BITS, MIN_BITS, load_policy, policy_file_dict
from ..predictions import accuracy, drop_points
from ..progress import Progress
from ..quantize import quantize
from ..runs import RunFolder, input_identity, write_atomic, write_json
from ..sim.engine import EngineAgreement, sim_predict
from ..sim.model import SimModel
from .dynamic import dynamic_policy
from .evaluator import Leaderboard, SimEvaluator
from .methods import METHODS, SEARCHES
from .space import OBJECTIVES, Budget, Objective, SearchSpace, layer_features


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

    def validate(self) -> None:
        if not self.bits or any(not MIN_BITS <= b <= MAX_BITS for b in self.bits):
            raise PtqauditError(f"--bits must list widths from {MIN_BITS} to {MAX_BITS}, got {list(self.bits)}")
        if self.objective not in OBJECTIVES + ("both",):
            raise PtqauditError(f"--objective must be worst, best or both, got {self.objective!r}")
        if self.method not in METHODS:
            raise PtqauditError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if (self.budget_avg_bits is None) == (self.budget_bitops is None):
            raise PtqauditError("give exactly one of --budget-avg-bits and --budget-bitops")
        for name in ("max_evaluations", "batch_size", "search_limit", "verify_top"):
            if getattr(self, name) < 1:
                raise PtqauditError(f"--{name.replace('_', '-')} must be at least 1")
        if self.dynamic and self.verify_top < 2:
            raise PtqauditError("--dynamic routes inputs among the verified candidates: it needs --verify-top 2 or more")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["bits"], values["layers"] = list(self.bits), list(self.layers)
        return values


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


def _searched_layers(model: LoadedModel, globs: tuple[str, ...]) -> list[str]:
    if not globs:
        return [layer.name for layer in model.layers]
    names = [layer.name for layer in model.layers if any(fnmatch.fnmatchcase(layer.name, g) for g in globs)]
    if not names:
        raise PtqauditError(f"--layers {', '.join(globs)} matches no layer (`ptqaudit layers MODEL` lists them)")
    return names


def run_search(config: SearchConfig, model: LoadedModel, dataset: Dataset, resume: bool = False,
               progress: bool = True, echo=print, search_data: Dataset | None = None) -> dict:
    """Search, verify on ORT, write the run folder; returns the summary (also in summary.json).
    search_data: where candidates are scored (the --search-split), else a subset of `dataset`."""
    config.validate()
    check_model_fits_data(model, dataset, config.batch_size)
    base = load_policy(config.base_policy).resolve(model.layers)
    budget = (Budget(config.budget_bitops) if config.budget_bitops is not None
              else Budget.from_average_bits(config.budget_avg_bits, model.total_macs))
    space = SearchSpace(model.layers, base, config.bits, _searched_layers(model, config.layers), budget)
    objectives = OBJECTIVES if config.objective == "both" else (Objective(config.objective),)
    for objective in objectives:
        space.check_budget(objective)

    folder = RunFolder(config.output)
    inputs = input_identity(model.path, [d for d in (dataset, search_data) if d is not None])
    with folder.start(config.to_dict(), resume, inputs, echo):
        return _search(config, model, dataset, search_data, folder, space, budget, objectives, resume, progress, echo)


def _search(config: SearchConfig, model: LoadedModel, dataset: Dataset, search_data: Dataset | None,
            folder: RunFolder, space: SearchSpace, budget: Budget, objectives: tuple[Objective, ...], resume: bool,
            progress: bool, echo) -> dict:
    """Search, verify and write the results: run_search's work, done while it holds the run folder."""
    memo = {r["digest"]: r["sim_accuracy"] for r in folder.read_trace()} if resume else {}
    if memo:
        echo(f"resuming {config.output}: {len(memo)} evaluations already in its trace are replayed, not recomputed")

    started = time.perf_counter()
    sim = SimModel(model).eval()
    search_set = (search_data if search_data is not None else dataset).subset(config.search_limit)
    echo(f"model {config.model} | data {dataset.name}, {len(dataset)} images (search on {len(search_set)} of "
         f"{search_set.name}) | batch size {config.batch_size} | budget {budget.effective_bits(model.total_macs):.2f} "
         f"effective bits | {config.method}, seed {config.seed}")
    features = layer_features(space.searched, [sim.quant_layer(layer.name).weight.detach().numpy()
                                               for layer in space.searched])
    evaluator = SimEvaluator(sim, search_set, config.batch_size, space, folder.append_trace, memo)
    boards = {}
    for objective in objectives:
        board = Leaderboard(objective, config.verify_top)
        evaluator.start_count(config.max_evaluations)
        scope = ("every policy the budget admits" if config.method == "exhaustive"
                 else f"up to {config.max_evaluations} policies")
        echo(f"searching the {objective} case: {config.method}, {scope} scored by the simulator on {len(search_set)} images")
        bar = Progress(config.max_evaluations, f"{config.method} search, {objective} case", "policy", progress)

        def show(done: int, best: float | None, total: int | None = None) -> None:
            if total is not None:  # a method that knows how many policies it will score (exhaustive)
                bar.total = total
            bar.update(done - bar.n)
            if best is not None:
                bar.set_postfix_str(f"{objective} sim accuracy {100 * best:.2f}%")

        SEARCHES[config.method](space=space, evaluator=evaluator, board=board, objective=objective,
                                max_evaluations=config.max_evaluations, seed=config.seed, features=features,
                                progress=show)
        bar.close()
        if not board.entries:
            raise PtqauditError(
                f"the {config.method} search found no {objective}-case policy within the budget in "
                f"{evaluator.evaluations} evaluations; raise --max-evaluations"
            )
        boards[objective] = (board, evaluator.evaluations)
    search_seconds = time.perf_counter() - started

    echo(f"measuring fp32 on ORT ({len(dataset)} images)")
    fp32 = predict(make_session(model.proto), dataset, config.batch_size, "fp32 (ORT)", progress)
    fp32_accuracy = accuracy(fp32.labels, dataset.y)
    summary = {
        "model": config.model, "dataset": dataset.name, "images": len(dataset), "search_dataset": search_set.name,
        "search_images": len(search_set),
        "batch_size": config.batch_size, "seed": config.seed, "method": config.method,
        "budget": {"bitops": budget.bitops, "effective_bits": budget.effective_bits(model.total_macs),
                   "worst": "policies at or above it", "best": "policies at or below it"},
        "bits": list(space.bits), "searched_layers": [layer.name for layer in space.searched],
        "base_policy": config.base_policy, "fp32_accuracy": fp32_accuracy, "search_seconds": search_seconds,
        "numbers": "accuracies are ONNX Runtime's on the whole evaluation set; sim_* are the simulator's",
    }
    for objective, (board, evaluations) in boards.items():
        count = len(board.entries)
        echo(f"verifying {count} {objective}-case candidate{'s' * (count != 1)} on ORT ({len(dataset)} images each)")
        verified = _verify(model, dataset, config, space, sim, board, objective, progress)
        chosen = verified[0]
        policy = space.policy(board.entries[chosen.digest].choice, f"{objective}-case")
        description = (f"{objective} case found by {config.method} search of {model.path.name} within "
                       f"{budget.effective_bits(model.total_macs):.2f} effective bits: {100 * chosen.ort_accuracy:.2f}% on ORT")
        write_atomic(folder.path / f"{objective}.yaml", yaml.safe_dump(policy_file_dict(policy, description), sort_keys=False))
        summary[objective] = {
            "ort_accuracy": chosen.ort_accuracy, "drop_points": drop_points(fp32_accuracy, chosen.ort_accuracy),
            "policy_file": f"{objective}.yaml", "evaluations": evaluations, "policy": chosen.layers,
            "candidates": [asdict(v) for v in verified],
        }
        if config.dynamic:
            echo(f"training the {objective}-case router on the simulator, then routing {len(dataset)} images on ORT")
            summary[objective]["dynamic"] = _dynamic(model, sim, search_set, dataset, config, space, board, verified,
                                                     objective, folder, fp32_accuracy, progress)
    if "worst" in boards and "best" in boards:
        summary["spread_points"] = drop_points(summary["best"]["ort_accuracy"], summary["worst"]["ort_accuracy"])
    summary["total_seconds"] = time.perf_counter() - started
    write_json(folder.path / "summary.json", summary)
    return summary


def _dynamic(model, sim, search_set, dataset, config, space, board, verified, objective, folder, fp32_accuracy,
             progress) -> dict:
    """The router over the verified candidates, its files (menu policies, weights) and numbers."""
    menu = [space.policy(board.entries[v.digest].choice, f"{objective}-menu-{v.rank}") for v in verified]
    router, result = dynamic_policy(model, sim, search_set, dataset, menu, objective, config.batch_size, config.seed,
                                    progress)
    for v, policy in zip(verified, menu):
        write_atomic(folder.path / f"{objective}-menu-{v.rank}.yaml", yaml.safe_dump(policy_file_dict(
            policy, f"{objective}-case menu entry {v.rank} of the dynamic policy"), sort_keys=False))
    buffer = io.BytesIO()
    torch.save({"state_dict": router.state_dict(), "menu": [f"{objective}-menu-{v.rank}.yaml" for v in verified],
                "per_batch": config.batch_size > 1}, buffer)
    write_atomic(folder.path / f"{objective}-router.pt", buffer.getvalue())
    return {**asdict(result), "drop_points": drop_points(fp32_accuracy, result.ort_accuracy),
            "router_file": f"{objective}-router.pt", "routing": "per batch" if config.batch_size > 1 else "per input"}


def _verify(model, dataset, config, space, sim, board: Leaderboard, objective: Objective, progress) -> list[Verified]:
    """ORT accuracy of each leading candidate on the whole evaluation set, ranked by it."""
    results = []
    for candidate in board.ranked:
        policy = space.policy(candidate.choice, f"{objective}-candidate")
        ort_run = predict(make_session(quantize(model, policy).proto), dataset, config.batch_size,
                          f"verify {objective} on ORT", progress)
        sim_run = sim_predict(sim, dataset, policy, config.batch_size, progress=False)
        results.append(Verified(
            rank=0, digest=candidate.digest, ort_accuracy=accuracy(ort_run.labels, dataset.y),
            sim_accuracy_search_subset=candidate.sim_accuracy,
            sim_top1_agreement_with_ort=EngineAgreement.between(ort_run, sim_run).top1_agreement,
            bitops=candidate.bitops, effective_bits=policy.effective_bits(model.layers),
            layers={name: (q.label if q else "fp32") for name, q in policy.mapping.items()},
        ))
    results.sort(key=lambda v: objective.key(v.ort_accuracy))
    for rank, result in enumerate(results, 1):
        result.rank = rank
    return results
