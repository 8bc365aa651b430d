"""The worker pool: ORT and simulator evaluations on worker processes and on Ray give what a serial run gives, in
order, and a worker that dies is replaced without losing or repeating a result."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ptqaudit.data import DataConfig, Dataset, load_dataset
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import load_policy
from ptqaudit.workers import EvaluationPool, Request, WorkerSettings
from test_cli import run_cli

DIGITS = Path(__file__).resolve().parents[1] / "sample_models" / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def digits():
    model = load_model(DIGITS)
    data = load_dataset(DataConfig("digits"))
    return model, data


def _requests(model, count: int, data: str = "test") -> list[Request]:
    """A mix of policies and batch sizes, in a fixed order."""
    policies = [None] + [load_policy(name).resolve(model.layers) for name in ("w8a8", "w4a4", "w2a8", "w4a8")]
    return [Request(policies[i % len(policies)], data, (1, 7, 64)[i % 3]) for i in range(count)]


def _logits(predictions) -> list[np.ndarray]:
    return [p.logits for p in predictions]


def test_processes_give_the_serial_results_in_order(digits):
    """Two worker processes (one ORT thread each) against this process (ORT's default threads): the same logits,
    bit for bit, in the order asked."""
    model, data = digits
    requests = _requests(model, 12)
    with EvaluationPool(model, {"test": data}, WorkerSettings(workers=1)) as serial:
        expected = _logits(serial.predict(requests))
    with EvaluationPool(model, {"test": data}, WorkerSettings(workers=2)) as pool:
        got = _logits(pool.predict(requests))
        assert pool._processes is not None  # the work really went to the workers
    for i, (a, b) in enumerate(zip(expected, got)):
        np.testing.assert_array_equal(a, b, err_msg=f"request {i}")


def _children(pool: EvaluationPool) -> list[int]:
    return list(pool._processes._processes) if pool._processes is not None else []


def test_a_killed_idle_worker_is_replaced(digits):
    """A worker killed between two batches of work: the next batch notices, starts a fresh pool and gives the
    serial results."""
    model, data = digits
    requests = _requests(model, 6)
    with EvaluationPool(model, {"test": data}, WorkerSettings(workers=1)) as serial:
        expected = _logits(serial.predict(requests))
    with EvaluationPool(model, {"test": data}, WorkerSettings(workers=2)) as pool:
        pool.predict(requests[:3])
        os.kill(_children(pool)[0], signal.SIGKILL)
        time.sleep(0.5)  # the pool's manager notices the death
        got = _logits(pool.predict(requests))
        assert pool.restarts == 1
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


SERIAL_SECONDS = 8.0  # two workers then take about half of it, after they start: the kill 2 s in lands mid-work


def test_a_worker_killed_mid_task_is_retried(digits):
    """A worker killed while the pool is busy: its task (and the others the broken pool dropped) run again on a
    fresh pool; every result is there once and equals the serial run's."""
    model, data = digits
    # tasks long enough on this machine that the kill lands while they run: the serial run takes SERIAL_SECONDS
    repeat = 6
    while True:
        repeated = np.arange(len(data)).repeat(repeat)
        slow = Dataset(f"digits x{repeat}", data.x[repeated], data.y[repeated], data.classes)
        requests = _requests(model, 8, "slow")
        started = time.monotonic()
        with EvaluationPool(model, {"slow": slow}, WorkerSettings(workers=1)) as serial:
            expected = _logits(serial.predict(requests))
        if time.monotonic() - started >= SERIAL_SECONDS:
            break
        repeat *= 2
    with EvaluationPool(model, {"slow": slow}, WorkerSettings(workers=2)) as pool:
        results = {}
        worker = threading.Thread(target=lambda: results.update(got=pool.predict(requests)))
        worker.start()
        deadline = time.monotonic() + 60
        while not _children(pool) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # started, and into its first tasks
        os.kill(_children(pool)[0], signal.SIGKILL)
        worker.join(timeout=300)
        assert pool.restarts >= 1
    assert len(results["got"]) == len(requests)
    for a, b in zip(expected, _logits(results["got"])):
        np.testing.assert_array_equal(a, b)


def _trace(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]


def _summary(run: Path) -> dict:
    values = json.loads((run / "summary.json").read_text())
    for key in ("search_seconds", "total_seconds", "model"):
        values.pop(key)
    return values


@pytest.mark.parametrize("method", ["rl", "greedy"])
def test_processes_give_the_serial_search(capsys, tmp_path, method):
    """A search on two worker processes (the simulator's groups of policies split between them, the verification's
    ORT and simulator runs spread over them) against one in this process: the same trace, record for record, and
    the same summary, for a fleet of both kernel families (the emulated one scored on the workers too)."""
    runs = {}
    for workers in (1, 2):
        run = runs[workers] = tmp_path / f"workers{workers}"
        code, _, err = run_cli(capsys, "search", DIGITS, "-o", run, "--method", method, "--max-evaluations", 20,
                               "--kernels", "exact,avx2-u8s8", "--no-progress", "--workers", workers)
        assert code == 0, err
    assert len(_trace(runs[1])) >= 20
    assert _trace(runs[1]) == _trace(runs[2])
    assert _summary(runs[1]) == _summary(runs[2])


def test_ray_executor_gives_the_serial_search_and_report(capsys, tmp_path):
    """search and report with --executor ray (a Ray instance started for the run, two workers) write the summary
    and the analysis a serial run writes."""
    pytest.importorskip("ray", reason="the Ray executor needs ray (pip install 'ptqaudit[ray]'; CI installs it)")
    import ray

    runs = {}
    for label, options in (("serial", ["--workers", "1"]), ("ray", ["--workers", "2", "--executor", "ray"])):
        run = tmp_path / label
        code, _, err = run_cli(capsys, "search", DIGITS, "-o", run, "--max-evaluations", 12, "--no-progress", *options)
        assert code == 0, err
        code, _, err = run_cli(capsys, "report", run, "--no-progress", "-o", tmp_path / f"{label}.md", *options)
        assert code == 0, err
        runs[label] = run
    ray.shutdown()
    assert _trace(runs["serial"]) == _trace(runs["ray"])  # the search's simulator work ran on Ray too
    summaries = [json.loads((runs[label] / "summary.json").read_text()) for label in ("serial", "ray")]
    analyses = [json.loads((runs[label] / "analysis.json").read_text()) for label in ("serial", "ray")]
    for values in summaries + analyses:
        for key in ("search_seconds", "total_seconds", "seconds", "model"):
            values.pop(key, None)
    for case in ("worst", "best"):
        assert summaries[0][case] == summaries[1][case]
    assert analyses[0]["layer_sensitivity"] == analyses[1]["layer_sensitivity"]
    assert analyses[0]["ship_policy"] == analyses[1]["ship_policy"]
    assert analyses[0]["corruptions"] == analyses[1]["corruptions"]
    shutil.rmtree(tmp_path)


def test_search_on_a_gpu_needs_one(capsys, tmp_path):
    """--device cuda moves the simulator to a GPU; without one it is exit 2 saying so, before any work."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the refusal is for machines without one")
    code, _, err = run_cli(capsys, "search", DIGITS, "--device", "cuda", "-o", tmp_path / "run")
    assert code == 2 and "no CUDA device" in err
    assert not (tmp_path / "run" / "trace.jsonl").exists()
