"""Benchmark: an audit's independent ORT evaluations on 1 worker against N, and on Ray against local processes.

Part A (verification): the shared ResNet-20's verification workload, candidate policies each measured on ORT over
--limit CIFAR-10 test images at batch size 1, through ptqaudit.workers.EvaluationPool with 1 worker (this
process, ORT's default threads) and with --workers processes (an equal share of the cores each), then on a Ray
instance started here with the same number of workers. The logits must be identical in every run.

Part B (analysis): the report's analysis of a short search run of the same model (--analysis-limit images), with 1
worker and with --workers; the two analysis.json files must agree.

Part C (search): a whole search of the same model (--search-evaluations policies per objective, scored by the
simulator on 1000 images, then verified on --limit), with 1 worker and with --workers: the simulator's groups of
policies and the verification are split among the workers. The traces and summaries must be identical.

Targets: N workers at least 1.7x faster than 1 on 2 cores; Ray within 15% of the process pool.

    python benchmarks/bench_scale.py [--data-root DIR] [--model ../shared/models/cifar10_resnet20.onnx]
        [--limit 2000] [--policies 8] [--analysis-limit 500] [--search-evaluations 100] [--method rl]
        [--workers 2] [--part a|b|c|all]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ptqaudit.analysis import AnalysisSettings, analyse, load_run
from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import LayerQuant, ResolvedPolicy
from ptqaudit.search.run import SearchConfig, run_search
from ptqaudit.workers import EvaluationPool, Request, WorkerSettings, available_cores

REPO = Path(__file__).resolve().parent.parent


def candidate_policies(model, count: int, seed: int = 0) -> list[ResolvedPolicy]:
    """Random per-layer widths (4, 6 or 8 bits), as a search's leading candidates look."""
    rng = np.random.default_rng(seed)
    return [ResolvedPolicy(f"candidate-{i}", {layer.name: LayerQuant(int(rng.choice([4, 6, 8])), int(rng.choice([4, 6, 8])))
                                              for layer in model.layers}) for i in range(count)]


def timed_predictions(model, data, requests, settings: WorkerSettings) -> tuple[list[np.ndarray], float]:
    started = time.perf_counter()
    with EvaluationPool(model, {"test": data}, settings) as pool:
        logits = [p.logits for p in pool.predict(requests)]
    return logits, time.perf_counter() - started


def part_a(args) -> bool:
    data = load_dataset(DataConfig("cifar10", root=args.data_root, limit=args.limit))
    model = load_model(args.model, data.x.shape[1:])
    requests = [Request(policy, "test", 1) for policy in candidate_policies(model, args.policies)]
    print(f"\nA. verification: {len(requests)} policies of {Path(args.model).name}, each on {len(data)} {data.name} "
          f"images at batch size 1 (times include starting the workers)")
    serial, serial_seconds = timed_predictions(model, data, requests, WorkerSettings(workers=1))
    parallel, parallel_seconds = timed_predictions(model, data, requests, WorkerSettings(workers=args.workers))
    ray_logits, ray_seconds = timed_predictions(model, data, requests, WorkerSettings(workers=args.workers, executor="ray"))
    same = all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(serial, parallel, ray_logits))
    print(f"{'executor':28s} {'seconds':>8s} {'speed-up':>9s}")
    print(f"{'1 worker (this process)':28s} {serial_seconds:8.1f} {1.0:8.2f}x")
    print(f"{f'{args.workers} local processes':28s} {parallel_seconds:8.1f} {serial_seconds / parallel_seconds:8.2f}x")
    print(f"{f'ray, {args.workers} workers':28s} {ray_seconds:8.1f} {serial_seconds / ray_seconds:8.2f}x")
    print(f"ray against the process pool: {ray_seconds / parallel_seconds:.2f}x the time; logits identical in all "
          f"three: {same}")
    return same


def part_b(args, out: Path) -> bool:
    data = DataConfig("cifar10", root=args.data_root, limit=args.limit)
    dataset = load_dataset(data)
    model = load_model(args.model, dataset.x.shape[1:])
    config = SearchConfig(model=args.model, data=data, output=str(out / "run"), max_evaluations=40, search_limit=500,
                          verify_top=2, seed=0)
    run_search(config, model, dataset, progress=False, echo=lambda m: None, workers=WorkerSettings(workers=1))
    settings = AnalysisSettings(limit=args.analysis_limit)
    print(f"\nB. the report's analysis of a search run of {Path(args.model).name} ({args.analysis_limit} analysis "
          f"images, the ship policy on {len(dataset)})")
    results = {}
    for workers in (1, args.workers):
        run = load_run(out / "run")
        started = time.perf_counter()
        analysis = analyse(run, settings, progress=False, echo=lambda m: None, workers=WorkerSettings(workers=workers))
        results[workers] = (time.perf_counter() - started, dataclasses.replace(analysis, seconds=0.0).to_dict())
    (one, first), (many, second) = results[1], results[args.workers]
    same = json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    print(f"1 worker {one:.0f} s, {args.workers} workers {many:.0f} s: {one / many:.2f}x faster; analyses identical: {same}")
    return same


def part_c(args, out: Path) -> bool:
    data = DataConfig("cifar10", root=args.data_root, limit=args.limit)
    dataset = load_dataset(data)
    model = load_model(args.model, dataset.x.shape[1:])
    print(f"\nC. a {args.method} search of {Path(args.model).name}: {args.search_evaluations} policies per objective on "
          f"1000 images, 3 candidates each verified on {len(dataset)} (times include starting the workers)")
    print(f"{'workers':10s} {'search s':>9s} {'total s':>8s} {'speed-up':>9s}")
    results = {}
    for workers in (1, args.workers):
        config = SearchConfig(model=args.model, data=data, output=str(out / f"search{workers}"), method=args.method,
                              max_evaluations=args.search_evaluations, seed=0)
        started = time.perf_counter()
        summary = run_search(config, model, dataset, progress=False, echo=lambda m: None,
                             workers=WorkerSettings(workers=workers))
        seconds = time.perf_counter() - started
        trace = (out / f"search{workers}" / "trace.jsonl").read_text()
        values = dataclasses.replace(summary, search_seconds=0.0, total_seconds=0.0).to_dict()
        results[workers] = (seconds, summary.search_seconds, trace, values)
        print(f"{workers:<10d} {summary.search_seconds:9.1f} {seconds:8.1f} {results[1][0] / seconds:8.2f}x")
    (_, _, trace_one, summary_one), (_, _, trace_many, summary_many) = results[1], results[args.workers]
    same = trace_one == trace_many and json.dumps(summary_one, sort_keys=True) == json.dumps(summary_many, sort_keys=True)
    print(f"search phase {results[1][1] / results[args.workers][1]:.2f}x faster on {args.workers} workers; traces and "
          f"summaries identical: {same}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO.parent / "shared/models/cifar10_resnet20.onnx"))
    parser.add_argument("--data-root", default=os.environ.get("PTQAUDIT_TEST_CIFAR10_ROOT"))
    parser.add_argument("--limit", type=int, default=2000, help="CIFAR-10 test images each policy is measured on")
    parser.add_argument("--policies", type=int, default=8, help="part A: candidate policies verified")
    parser.add_argument("--analysis-limit", type=int, default=500, help="part B: the analysis's images")
    parser.add_argument("--search-evaluations", type=int, default=100, help="part C: policies per objective")
    parser.add_argument("--method", default="rl", help="part C: the search method")
    parser.add_argument("--workers", type=int, default=available_cores())
    parser.add_argument("--part", choices=["a", "b", "c", "all"], default="all")
    args = parser.parse_args()
    print(f"hardware: {platform.processor() or platform.machine()}, {available_cores()} cores available; python "
          f"{platform.python_version()}, onnxruntime {ort.__version__}")
    ok = True
    if args.part in ("a", "all"):
        ok &= part_a(args)
    if args.part in ("b", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            ok &= part_b(args, Path(tmp))
    if args.part in ("c", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            ok &= part_c(args, Path(tmp))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
