"""Many independent ONNX Runtime evaluations at once: in this process, on local worker processes, or on a Ray cluster.

An audit's ORT work is a list of independent predictions (a policy, a dataset, a batch size): the search's
verification, the report's analysis. An EvaluationPool takes such lists and returns the predictions in the
order asked, identical to a serial run whatever the number of workers or nodes. The model and the datasets go to
each worker once (process start-up arguments, or Ray's object store), not with every task. Each worker's ORT
sessions get an explicit share of the cores (cores / workers intra-op threads), so that N workers do not
oversubscribe them. Where the thread count is part of the arithmetic (DynamicQuantizeLSTM splits the batch
among threads, sim/recurrent.py), every session keeps the audit's own thread setting instead. A task whose worker
dies is run again (up to MAX_ATTEMPTS times), and its result is kept once.
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

from .data import Dataset
from .errors import PtqauditError
from .evaluate import make_session, predict
from .onnx_graph import LoadedModel
from .policy import ResolvedPolicy
from .predictions import Predictions
from .progress import Progress
from .quantize import quantize

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


class _Evaluator:
    """What every worker holds: the model, the datasets and one session per policy."""

    def __init__(self, model: LoadedModel, datasets: dict[str, Dataset], threads: int):
        self.model, self.datasets, self.threads = model, datasets, threads
        self._sessions: dict = {}

    def session(self, policy: ResolvedPolicy | None):
        """The ORT session of a policy's graph (None: FP32), made once."""
        key = None if policy is None else policy.digest
        if key not in self._sessions:
            graph = self.model.proto if policy is None else quantize(self.model, policy)
            self._sessions[key] = make_session(graph, threads=self.threads)
        return self._sessions[key]

    def __call__(self, request: Request) -> Predictions:
        return predict(self.session(request.policy), self.datasets[request.data], request.batch_size, "",
                       progress=False)


_WORKER: _Evaluator | None = None  # a local worker process's evaluator, made once at its start


def _start_worker(model: LoadedModel, datasets: dict[str, Dataset], threads: int) -> None:
    global _WORKER
    _WORKER = _Evaluator(model, datasets, threads)


def _run_in_worker(request: Request) -> Predictions:
    return _WORKER(request)


_RAY_EVALUATORS: dict[str, _Evaluator] = {}  # a Ray worker's evaluators, by pool (its sessions outlive a task)


def _run_on_ray(context: tuple, request: Request) -> Predictions:
    token, model, datasets, threads = context
    if token not in _RAY_EVALUATORS:
        _RAY_EVALUATORS.clear()  # one pool at a time per worker: an earlier pool's sessions are not needed again
        _RAY_EVALUATORS[token] = _Evaluator(model, datasets, threads)
    return _RAY_EVALUATORS[token](request)


def _session_threads(model: LoadedModel, settings: WorkerSettings) -> int:
    """Intra-op threads of each worker's sessions: a share of the cores, unless threads change the numbers."""
    if settings.threads or any(layer.kind.op_type == "LSTM" for layer in model.layers):
        return settings.threads
    return max(1, available_cores() // settings.count)


class EvaluationPool:
    """ORT predictions of one model on named datasets, many at a time. Small batches of work run in this process;
    a worker pool starts when the work is worth it, and stays until close()."""

    def __init__(self, model: LoadedModel, datasets: dict[str, Dataset], settings: WorkerSettings = WorkerSettings()):
        settings.validate()
        self.model, self.datasets, self.settings = model, datasets, settings
        self.local = _Evaluator(model, datasets, settings.threads)
        self.restarts = 0  # times a dead worker process was replaced
        self._processes: concurrent.futures.ProcessPoolExecutor | None = None
        self._ray = None  # (the remote function, the shipped context) once Ray is in use

    def __enter__(self) -> "EvaluationPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._processes is not None:
            self._processes.shutdown(cancel_futures=True)
            self._processes = None

    def predict(self, requests: list[Request], desc: str = "", progress: bool = False, unit: str = "run",
                done: Callable[[int], None] | None = None) -> list[Predictions]:
        """The predictions of every request, in the order given (progress: a bar with one step per request done;
        done(i): called as request i's result arrives)."""
        bar = Progress(len(requests), desc or "ORT evaluations", unit, progress)

        def step(index: int) -> None:  # request `index`'s result has arrived
            bar.update(1)
            if done is not None:
                done(index)

        results: list[Predictions | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        try:
            started = self._processes is not None or self._ray is not None
            if pending and (self.settings.count == 1 or (not self.settings.workers and not started)):
                # one worker, or the default number while none runs yet: the first task in this process, which
                # times the work; the default starts workers only for work worth starting them
                began = time.perf_counter()
                results[0] = self.local(requests[0])
                step(0)
                pending = pending[1:]
                small = (time.perf_counter() - began) * len(pending) < POOL_WORTHWHILE_SECONDS
                if (self.settings.count == 1 or small) and self.settings.executor == "local":
                    for i in pending:
                        results[i] = self.local(requests[i])
                        step(i)
                    pending = []
            if pending and self.settings.executor == "ray":
                self._on_ray(requests, pending, results, step)
            elif pending:
                self._on_processes(requests, pending, results, step)
        finally:
            bar.close()
        return results

    def _on_processes(self, requests: list[Request], pending: list[int], results: list, step: Callable[[int], None]) -> None:
        attempts = {i: 0 for i in pending}
        while pending:
            if self._processes is None:
                threads = _session_threads(self.model, self.settings)
                # spawned, not forked: a fork of a process running torch's thread pools can deadlock
                self._processes = concurrent.futures.ProcessPoolExecutor(
                    self.settings.count, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                    initargs=(self.model, self.datasets, threads))
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

    def _on_ray(self, requests: list[Request], pending: list[int], results: list, step: Callable[[int], None]) -> None:
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
            context = ray.put((uuid.uuid4().hex, self.model, self.datasets, threads))
            self._ray = (remote, context)
        remote, context = self._ray
        references = {remote.remote(context, requests[i]): i for i in pending}
        waiting = list(references)
        while waiting:
            finished, waiting = ray.wait(waiting, num_returns=1)
            for reference in finished:
                results[references[reference]] = ray.get(reference)
                step(references[reference])
