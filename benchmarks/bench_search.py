"""Benchmark: how close the RL search gets to the true worst and best case, and what it costs.

Part A (enumerable space): the digits sample model, bits {2,4,8} for every weight and activation
(3^8 = 6,561 policies), budget 6 effective bits. Exhaustive enumeration gives the true worst and best
simulator accuracy on the search subset; RL and random search get 10% of the admitted policies'
evaluations. Target: RL within 0.5 points of the true worst and best.

Part B (the shared ResNet-20, budget 6, bits 2,3,4,5,6,8): RL versus random search with the same
number of evaluations, worst and best, all verified on ONNX Runtime over the CIFAR-10 test set, and the
wall time of the whole search (target: under 15 minutes on 2 CPU cores).

    python benchmarks/bench_search.py [--part a|b|both] [--data-root DIR] [--max-evaluations 400]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.onnx_graph import load_model
from ptqaudit.search.run import SearchConfig, SearchSummary, run_search

REPO = Path(__file__).resolve().parent.parent


def search(model_path: str, data: DataConfig, method: str, out: Path, **settings) -> tuple[SearchSummary, float]:
    model, dataset = load_model(model_path), load_dataset(data)
    config = SearchConfig(model=model_path, data=data, output=str(out / method), method=method, **settings)
    started = time.perf_counter()
    summary = run_search(config, model, dataset, progress=False, echo=lambda m: None)
    return summary, time.perf_counter() - started


def sim_best(summary: SearchSummary, objective: str) -> float:
    """The simulator accuracy (search subset) of the best candidate the search found."""
    accuracies = [c.sim_accuracy_search_subset for c in getattr(summary, objective).candidates]
    return min(accuracies) if objective == "worst" else max(accuracies)


def part_a(out: Path) -> bool:
    data = DataConfig(name="digits")
    settings = dict(bits=(2, 4, 8), budget_avg_bits=6.0, search_limit=540, verify_top=1, seed=0)
    model = str(REPO / "sample_models/digits_cnn.onnx")
    truth, truth_seconds = search(model, data, "exhaustive", out, max_evaluations=10_000, **settings)
    print(f"\nA. {Path(model).name}, bits {{2,4,8}} on 4 layers (6,561 policies), budget 6 effective bits, "
          f"search and verification on the 540-image digits test split")
    print(f"{'objective':10s} {'method':11s} {'evaluations':>11s} {'sim acc':>8s} {'gap (pts)':>10s} {'ORT acc':>8s} {'seconds':>8s}")
    ok = True
    for objective in ("worst", "best"):
        admitted = getattr(truth, objective).evaluations
        budget = max(1, admitted // 10)
        print(f"{objective:10s} {'exhaustive':11s} {admitted:11d} {100 * sim_best(truth, objective):7.2f}% {'':>10s} "
              f"{100 * getattr(truth, objective).ort_accuracy:7.2f}% {truth_seconds:8.1f}")
        for method in ("rl", "random"):
            found, seconds = search(model, data, method, out / objective, max_evaluations=budget,
                                    objective=objective, **{**settings, "verify_top": 3})
            gap = 100 * abs(sim_best(found, objective) - sim_best(truth, objective))
            print(f"{objective:10s} {method:11s} {getattr(found, objective).evaluations:11d} "
                  f"{100 * sim_best(found, objective):7.2f}% {gap:10.2f} {100 * getattr(found, objective).ort_accuracy:7.2f}% "
                  f"{seconds:8.1f}")
            if method == "rl" and gap > 0.5:
                ok = False
    return ok


def part_b(out: Path, data_root: str | None, max_evaluations: int) -> None:
    model = str(REPO.parent / "shared/models/cifar10_resnet20.onnx")
    data = DataConfig(name="cifar10", root=data_root)
    settings = dict(budget_avg_bits=6.0, max_evaluations=max_evaluations, seed=0)
    print(f"\nB. {Path(model).name}, bits 2,3,4,5,6,8, budget 6 effective bits, {max_evaluations} evaluations per "
          f"objective, search on 1,000 images, verification on the 10,000-image test set (ORT, batch size 1)")
    print(f"{'method':8s} {'worst ORT':>10s} {'best ORT':>9s} {'spread':>7s} {'FP32':>7s} {'wall time':>10s}")
    for method in ("rl", "random"):
        summary, seconds = search(model, data, method, out, **settings)
        print(f"{method:8s} {100 * summary.worst.ort_accuracy:9.2f}% {100 * summary.best.ort_accuracy:8.2f}% "
              f"{summary.spread_points:7.2f} {100 * summary.fp32_accuracy:6.2f}% {seconds / 60:8.1f} min")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    parser.add_argument("--data-root", default=os.environ.get("PTQAUDIT_TEST_CIFAR10_ROOT"))
    parser.add_argument("--max-evaluations", type=int, default=400, help="per objective (the CLI default)")
    args = parser.parse_args()
    print(f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("a", "both"):
            ok = part_a(Path(tmp) / "a")
        if args.part in ("b", "both"):
            part_b(Path(tmp) / "b", args.data_root, args.max_evaluations)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
