"""Scoring candidate policies with the simulator: memoized, counted, traced, ranked per objective."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..data import Dataset
from ..predictions import Predictions, accuracy
from ..sim.engine import sim_predict_many
from ..sim.model import SimModel
from ..workers import EvaluationPool, SimRequest
from .space import Objective, SearchSpace


PACE_TRIALS = 2  # groups timed in each place before a search keeps scoring in the faster one


@dataclass(order=True)
class Candidate:
    sort_key: float  # lower is better for the objective being searched
    digest: str = field(compare=False)
    choice: np.ndarray = field(compare=False, repr=False)
    sim_accuracy: float = field(compare=False)
    bitops: int = field(compare=False)


class SimEvaluator:
    """Simulator accuracy of policies on the search subset. Results are memoized by policy digest
    (seeded from a resumed run's trace, so a replayed search skips work already done), and every new
    evaluation is handed to `record` for the run's trace. A search may count at most `limit` distinct
    policies (memoized ones included, each once): the cap is kept here, whatever group sizes the search
    methods ask for, so that --max-evaluations holds exactly. With a worker pool, a group of policies may be
    split among the workers instead, where that was measured faster (the same scores, in the same order)."""

    def __init__(self, sims: SimModel | list[SimModel], dataset: Dataset, batch_size: int, space: SearchSpace, record,
                 memo: dict, pool: tuple[EvaluationPool, str] | None = None):
        """sims: one simulator, or one per kernel family of a fleet: a policy scores its lowest accuracy.
        pool: a worker pool holding `dataset` under the given key, and these simulators for work it runs here."""
        self.sims = sims if isinstance(sims, list) else [sims]
        self.dataset, self.batch_size, self.space = dataset, batch_size, space
        self.pool = pool
        self._pace: dict[str, list[float]] = {"here": [], "workers": []}  # seconds per policy of each group
        self.record = record
        self.memo = memo  # digest -> simulator accuracy
        self.step = len(memo)  # records in the run's trace so far: the next record's step number
        self.evaluations = 0  # distinct policies scored in this search (memoized ones included)
        self.limit: int | None = None  # the most distinct policies this search may score (None: no cap)
        self._seen: set[str] = set()

    def start_count(self, limit: int | None = None) -> None:
        """Count distinct policies from zero, for the next search, which may score at most `limit` of them
        (None: no cap); memoized results stay."""
        self.evaluations = 0
        self.limit = limit
        self._seen = set()

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.evaluations >= self.limit

    def accuracies(self, choices: list[np.ndarray], objective: Objective, method: str) -> list[float]:
        """The accuracy of each of `choices` in order, as far as the cap allows: the list ends before the
        first policy new to this search once the cap is reached, so it may be shorter than `choices`
        (empty when the cap was already reached). A policy already counted is not counted again."""
        policies = []
        for choice in choices:
            policy = self.space.policy(choice)
            if policy.digest not in self._seen:
                if self.exhausted:
                    break
                self._seen.add(policy.digest)
                self.evaluations += 1
            policies.append(policy)
        todo = {p.digest: p for p in policies if p.digest not in self.memo}
        if todo:
            scores = np.min([[accuracy(run.labels, self.dataset.y) for run in runs]
                             for runs in self._predictions(list(todo.values()))], axis=0)
            records = []
            for (digest, policy), score in zip(todo.items(), scores):
                self.memo[digest] = float(score)
                self.step += 1
                bitops = policy.bitops(self.space.searched)  # the budget's cost: the searched layers' BitOPs
                records.append({"step": self.step, "objective": str(objective), "method": method, "digest": digest,
                                "sim_accuracy": self.memo[digest], "bitops": bitops,
                                "effective_bits": self.space.effective_bits(bitops),
                                "policy": {name: (q.label if q else "fp32") for name, q in policy.mapping.items()}})
            self.record(records)
        return [self.memo[p.digest] for p in policies]

    def _predictions(self, policies: list) -> list[list[Predictions]]:
        """Each simulator's predictions of every policy, in order: here, or split among the pool's workers,
        whichever was measured faster (the numbers are the same either way)."""
        place = self._place()
        began = time.perf_counter()
        if place == "here":
            results = [sim_predict_many(sim, self.dataset, policies, self.batch_size, progress=False)
                       for sim in self.sims]
        else:
            results = self._on_workers(policies)
        seconds = time.perf_counter() - began
        self._pace[place].append(seconds / len(policies))
        if self.pool is not None and self.limit is not None:  # the work ahead at this pace: the rest of the cap
            self.pool[0].consider(seconds / len(policies) * (self.limit - self.evaluations))
        return results

    def _place(self) -> str:
        """Where the next group is scored. Torch's threads in this process share the work of a group's policies
        (forward_many); workers split the group and lose part of that sharing but not the threads' overhead,
        so which is faster depends on the model and the machine: each place is timed on a few groups (the
        workers' first, which starts them, not counted), then the faster is kept."""
        if self.pool is None or not self.pool[0].distributes:
            return "here"
        if len(self._pace["workers"]) < 1 + PACE_TRIALS:
            return "workers"
        if len(self._pace["here"]) < PACE_TRIALS:
            return "here"
        return min(("workers", "here"), key=lambda place: np.mean(self._pace[place][-PACE_TRIALS:]))

    def _on_workers(self, policies: list) -> list[list[Predictions]]:
        pool, data = self.pool
        # consecutive policies stay together: a method orders them so that neighbours share work (forward_many)
        groups = np.array_split(np.arange(len(policies)), min(pool.parallelism, len(policies)))
        requests = [SimRequest(tuple(policies[i] for i in group), data, self.batch_size, sim.kernel_family)
                    for sim in self.sims for group in groups]
        results = pool.predict(requests)
        return [[run for runs in results[f * len(groups):(f + 1) * len(groups)] for run in runs]
                for f in range(len(self.sims))]


class Leaderboard:
    """The k best distinct policies found for one objective (lowest accuracy for worst, highest for best)."""

    def __init__(self, objective: Objective, size: int):
        self.objective, self.size = objective, size
        self.entries: dict[str, Candidate] = {}

    def key(self, sim_accuracy: float) -> float:
        return self.objective.key(sim_accuracy)

    def candidate(self, space: SearchSpace, choice: np.ndarray, accuracy: float) -> Candidate:
        """A scored choice as this board ranks it."""
        return Candidate(self.key(accuracy), space.policy(choice).digest, choice.copy(), accuracy, space.bitops(choice))

    def offer(self, space: SearchSpace, choices: list[np.ndarray], accuracies: list[float]) -> None:
        for choice, acc in zip(choices, accuracies):
            candidate = self.candidate(space, choice, acc)
            self.entries.setdefault(candidate.digest, candidate)
        ranked = sorted(self.entries.values())[: self.size]
        self.entries = {c.digest: c for c in ranked}

    @property
    def ranked(self) -> list[Candidate]:
        return sorted(self.entries.values())

    @property
    def best_accuracy(self) -> float | None:
        return self.ranked[0].sim_accuracy if self.entries else None
