"""Many independent evaluations at once: in this process, on local worker processes, or on a Ray cluster.

An audit is mostly lists of independent predictions: ORT's (a policy, a dataset, a batch size: the search's
verification, the report's analysis) and the simulator's (a group of policies scored by the search's methods and
agent, the verification's agreement). An EvaluationPool takes such lists and returns the predictions in the
order asked, identical to a serial run whatever the number of workers or nodes. The model and the datasets go to
each worker once (process start-up arguments, or Ray's object store), not with every task. Each worker's ORT
sessions and torch get an explicit share of the cores (cores / workers threads), so that N workers do not
oversubscribe them. Where the thread count is part of the arithmetic (DynamicQuantizeLSTM splits the batch
among threads, sim/recurrent.py), every ORT session keeps the audit's own thread setting instead, and the
simulators reproduce that setting. A task whose worker dies is run again (up to MAX_ATTEMPTS times), and its
result is kept once.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from concurrent.futures.process import BrokenProcessPool
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .data import Dataset
from .errors import PtqauditError
from .evaluate import make_session, predict
from .onnx_graph import LoadedModel
from .policy import ResolvedPolicy
from .predictions import Predictions
from .progress import Progress
from .quantize import quantize
from .sim.engine import sim_predict_many
from .sim.model import SimModel

EXECUTORS = ("local", "ray")
MAX_ATTEMPTS = 3  # runs of one task whose worker died before it gives up
# serial work below this runs in this process: starting worker processes (a few seconds each) would cost more
POOL_WORTHWHILE_SECONDS = 8.0


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class WorkerSettings:
    """Where an audit's independent ORT evaluations run (a setting of the machine, not of the results)."""

    workers: int = 0  # processes (or Ray tasks at once); 0: one per available core, when the work is worth it
    executor: str = "local"  # local processes, or ray
    ray_address: str = ""  # a Ray cluster's address; "": a Ray instance started on this machine
    threads: int = 0  # the audit's ORT intra-op threads per session (0: ORT's default)

    def validate(self) -> None:
        if self.executor not in EXECUTORS:
            raise PtqauditError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.workers < 0:
            raise PtqauditError("--workers must be 0 (one per core) or more")
        if self.ray_address and self.executor != "ray":
            raise PtqauditError("--ray-address needs --executor ray")

    @property
    def count(self) -> int:
        return self.workers or available_cores()


@dataclass(frozen=True)
class Request:
    """One ORT prediction: a policy (None: FP32) on one of the pool's datasets at a batch size."""

    policy: ResolvedPolicy | None
    data: str
    batch_size: int


@dataclass(frozen=True)
class SimRequest:
    """The simulator's predictions of a group of policies on one of the pool's datasets at a batch size, with the
    integer arithmetic of a kernel family (ptqaudit.kernels). A group shares the work its policies have in common
    (SimModel.forward_many), so a caller splits its policies into as few groups as there are workers."""

    policies: tuple[ResolvedPolicy, ...]
    data: str
    batch_size: int
    kernel_family: str


class _Evaluator:
    """What every worker holds: the model, the datasets, one ORT session per policy and one simulator per kernel
    family (in this process: the caller's own simulators, on whatever device they are)."""

    def __init__(self, model: LoadedModel, datasets: dict[str, Dataset], threads: int,
                 sims: dict[str, SimModel] | None = None):
        self.model, self.datasets, self.threads = model, datasets, threads
        self._sessions: dict = {}
        self._sims = dict(sims or {})

    def sim(self, kernel_family: str) -> SimModel:
        """The simulator of a kernel family, made once; it reproduces the ORT sessions' thread setting."""
        if kernel_family not in self._sims:
            self._sims[kernel_family] = SimModel(self.model, kernel_family, ort_threads=self.threads).eval()
        return self._sims[kernel_family]

    def session(self, policy: ResolvedPolicy | None):
        """The ORT session of a policy's graph (None: FP32), made once."""
        key = None if policy is None else policy.digest
        if key not in self._sessions:
            graph = self.model.proto if policy is None else quantize(self.model, policy)
            self._sessions[key] = make_session(graph, threads=self.threads)
        return self._sessions[key]

    def __call__(self, request: Request | SimRequest) -> Predictions | list[Predictions]:
        if isinstance(request, SimRequest):
            return sim_predict_many(self.sim(request.kernel_family), self.datasets[request.data],
                                    list(request.policies), request.batch_size, progress=False)
        return predict(self.session(request.policy), self.datasets[request.data], request.batch_size, "",
                       progress=False)


_WORKER: _Evaluator | None = None  # a local worker process's evaluator, made once at its start


def _start_worker(model: LoadedModel, datasets: dict[str, Dataset], threads: int, torch_threads: int) -> None:
    global _WORKER
    torch.set_num_threads(torch_threads)
    _WORKER = _Evaluator(model, datasets, threads)


def _run_in_worker(request: Request | SimRequest) -> Predictions | list[Predictions]:
    return _WORKER(request)


_RAY_EVALUATORS: dict[str, _Evaluator] = {}  # a Ray worker's evaluators, by pool (its sessions outlive a task)


def _run_on_ray(context: tuple, request: Request | SimRequest) -> Predictions | list[Predictions]:
    token, model, datasets, threads, torch_threads = context
    if token not in _RAY_EVALUATORS:
        _RAY_EVALUATORS.clear()  # one pool at a time per worker: an earlier pool's sessions are not needed again
        torch.set_num_threads(torch_threads)
        _RAY_EVALUATORS[token] = _Evaluator(model, datasets, threads)
    return _RAY_EVALUATORS[token](request)


def _core_share(settings: WorkerSettings) -> int:
    """Each worker's equal share of the cores."""
    return max(1, available_cores() // settings.count)


def _session_threads(model: LoadedModel, settings: WorkerSettings) -> int:
    """Intra-op threads of each worker's sessions: a share of the cores, unless threads change the numbers."""
    if settings.threads or any(layer.kind.op_type == "LSTM" for layer in model.layers):
        return settings.threads
    return _core_share(settings)


class EvaluationPool:
    """Predictions of one model on named datasets, many at a time: ORT's (Request) and the simulator's
    (SimRequest). Work runs in this process until workers are worth starting (an explicit --workers above one, Ray,
    or the default once the work would take more than POOL_WORTHWHILE_SECONDS serially); the workers then stay
    until close()."""

    def __init__(self, model: LoadedModel, datasets: dict[str, Dataset], settings: WorkerSettings = WorkerSettings(),
                 sims: dict[str, SimModel] | None = None):
        """sims: the caller's simulators by kernel family, which requests run in this process use (the workers make
        their own, on the CPU)."""
        settings.validate()
        self.model, self.datasets, self.settings = model, datasets, settings
        self.local = _Evaluator(model, datasets, settings.threads, sims)
        self.restarts = 0  # times a dead worker process was replaced
        self._processes: concurrent.futures.ProcessPoolExecutor | None = None
        self._ray = None  # (the remote function, the shipped context) once Ray is in use
        self._wanted = False  # the default number of workers, once the work was found worth them

    def __enter__(self) -> "EvaluationPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._processes is not None:
            self._processes.shutdown(cancel_futures=True)
            self._processes = None

    @property
    def distributes(self) -> bool:
        """Whether requests go to the workers (else they run in this process)."""
        if self.settings.executor == "ray":
            return True
        return self.settings.count > 1 and (self.settings.workers > 1 or self._wanted)

    @property
    def parallelism(self) -> int:
        """How many requests run at once: the groups a caller should split its work into."""
        return self.settings.count if self.distributes else 1

    def consider(self, serial_seconds: float) -> None:
        """Start using the default number of workers if the work ahead would take more than
        POOL_WORTHWHILE_SECONDS in this process (a worker takes a few seconds to start)."""
        if serial_seconds > POOL_WORTHWHILE_SECONDS:
            self._wanted = True

    def predict(self, requests: list[Request | SimRequest], desc: str = "", progress: bool = False, unit: str = "run",
                done: Callable[[int], None] | None = None) -> list:
        """The result of every request, in the order given: a Request's Predictions, a SimRequest's list of them
        (progress: a bar with one step per request done; done(i): called as request i's result arrives)."""
        bar = Progress(len(requests), desc or "evaluations", unit, progress)

        def step(index: int) -> None:  # request `index`'s result has arrived
            bar.update(1)
            if done is not None:
                done(index)

        results: list = [None] * len(requests)
        pending = list(range(len(requests)))

        def run_here(index: int) -> None:
            results[index] = self.local(requests[index])
            step(index)

        try:
            if pending and not self.distributes and self.settings.count > 1:
                # the default number of workers, none running yet: the first request here times the work
                began = time.perf_counter()
                run_here(pending.pop(0))
                self.consider((time.perf_counter() - began) * len(pending))
            if not self.distributes:
                for i in pending:
                    run_here(i)
            elif self.settings.executor == "ray":
                self._on_ray(requests, pending, results, step)
            else:
                self._on_processes(requests, pending, results, step)
        finally:
            bar.close()
        return results

    def _on_processes(self, requests: list, pending: list[int], results: list, step: Callable[[int], None]) -> None:
        attempts = {i: 0 for i in pending}
        while pending:
            if self._processes is None:
                threads = _session_threads(self.model, self.settings)
                # spawned, not forked: a fork of a process running torch's thread pools can deadlock
                self._processes = concurrent.futures.ProcessPoolExecutor(
                    self.settings.count, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                    initargs=(self.model, self.datasets, threads, _core_share(self.settings)))
            try:
                futures = {self._processes.submit(_run_in_worker, requests[i]): i for i in pending}
            except BrokenProcessPool:  # a worker died while the pool was idle
                futures = {}
            broken = not futures
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                step(i)
            pending = [i for i in pending if results[i] is None]
            if broken:
                # a worker died (killed, out of memory): the pool cannot go on, a fresh one runs what is left. Its
                # surviving workers are stopped first (the pool's own clean-up would wait for their tasks)
                for process in list(self._processes._processes.values()):
                    process.kill()
                self._processes.shutdown(wait=False, cancel_futures=True)
                self._processes = None
                self.restarts += 1
                for i in pending:
                    attempts[i] += 1
                if any(attempts[i] >= MAX_ATTEMPTS for i in pending):
                    raise PtqauditError(f"an ORT evaluation's worker process died {MAX_ATTEMPTS} times; giving up")

    def _on_ray(self, requests: list, pending: list[int], results: list, step: Callable[[int], None]) -> None:
        try:
            import ray
        except ImportError as exc:
            raise PtqauditError("--executor ray needs Ray: pip install 'ptqaudit[ray]'") from exc
        if self._ray is None:
            if not ray.is_initialized():
                try:
                    ray.init(address=self.settings.ray_address or None, include_dashboard=False, log_to_driver=False,
                             num_cpus=None if self.settings.ray_address else self.settings.count)
                except (ConnectionError, RuntimeError) as exc:
                    raise PtqauditError(f"cannot reach the Ray cluster at {self.settings.ray_address!r}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
            threads = _session_threads(self.model, self.settings)
            # Ray runs a task again when its worker dies (max_retries); the model and data travel once
            remote = ray.remote(num_cpus=max(1, threads), max_retries=MAX_ATTEMPTS - 1)(_run_on_ray)
            context = ray.put((uuid.uuid4().hex, self.model, self.datasets, threads, _core_share(self.settings)))
            self._ray = (remote, context)
        remote, context = self._ray
        references = {remote.remote(context, requests[i]): i for i in pending}
        waiting = list(references)
        while waiting:
            finished, waiting = ray.wait(waiting, num_returns=1)
            for reference in finished:
                results[references[reference]] = ray.get(reference)
                step(references[reference])
