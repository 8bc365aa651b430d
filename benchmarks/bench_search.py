"""Benchmark: how close the RL search gets to the true worst and best case, and what it costs.

Part A (enumerable space): the digits sample model, bits {2,4,8} for every weight and activation
(3^8 = 6,561 policies), budget 6 effective bits. Exhaustive enumeration gives the true worst and best
simulator accuracy on the search subset; RL and random search get 10% of the admitted policies'
evaluations. Target: RL within 0.5 points of the true worst and best.

Part B (the shared ResNet-20, budget 6, bits 2,3,4,5,6,8): RL versus random search with the same
number of evaluations, worst and best, all verified on ONNX Runtime over the CIFAR-10 test set, and the
wall time of the whole search (target: under 15 minutes on 2 CPU cores).

Part C (depth): the 56-layer digits ResNet and the shared ResNet-20, worst and best case with 100 and 400
evaluations, RL and random search against the most extreme uniform policy inside the budget, and the
evaluations spent on uniform policies and on sensitivity probes. Target: both cases within the cap, each at
least as extreme as the uniform policy.

Part D (text): the sample BERT (as given and fused by ORT's transformer optimizer) and LSTM on GLUE SST-2 (sentences tokenized with sample_models/sst2_tokenizer.json,
padded per batch, batch size 1), budget 6 effective bits, as part C: RL and random search with 100 evaluations per
objective, scored by the simulator on --text-search-limit dev sentences and verified on ORT over all 872.

    python benchmarks/bench_search.py [--part a|b|c|d|all] [--data-root DIR] [--max-evaluations 400] [--caps 100,400]
        [--c-models digits_resnet56,cifar10_resnet20] [--sst2-root DIR] [--text-search-limit 200]
        [--d-models sst2_bert,sst2_bert:bert,sst2_lstm]
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
from ptqaudit.policy import load_policy
from ptqaudit.search.run import SearchConfig, SearchSummary, run_search
from ptqaudit.search.space import Objective, SearchSpace
from ptqaudit.text_data import TextConfig

REPO = Path(__file__).resolve().parent.parent


def search(model_path: str, data: DataConfig, method: str, out: Path, **settings) -> tuple[SearchSummary, float]:
    dataset = load_dataset(data)
    model = load_model(model_path, dataset.sample_shape, settings.get("optimize", ""))
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


def part_c(out: Path, data_root: str | None, limit: int, search_limit: int, caps: list[int], names: list[str]) -> None:
    """Depth: the 56-layer digits ResNet and the shared ResNet-20, worst and best case at each cap, RL and random
    search against the most extreme uniform policy inside the budget (all on ORT), and the share of each
    search's evaluations that went to the uniform policies and to sensitivity (0 with the gradient prior)."""
    models = [(str(REPO / "sample_models/digits_resnet56.onnx"), DataConfig(name="digits")),
              (str(REPO.parent / "shared/models/cifar10_resnet20.onnx"), DataConfig(name="cifar10", root=data_root, limit=limit))]
    for model, data in [(m, d) for m, d in models if Path(m).stem in names]:
        layers = len(load_model(model).layers)
        print(f"\nC. {Path(model).name} ({layers} layers), bits 2,3,4,5,6,8, budget 6 effective bits, search on "
              f"{search_limit} images, verification on {data.limit or 'all'} {data.name} images (ORT, batch size 1)")
        compare_methods(model, data, caps, search_limit, out / Path(model).stem)


def part_d(out: Path, sst2_root: str | None, search_limit: int, models: list[str]) -> None:
    """Text: the sample BERT (as given, and fused by ORT's transformer optimizer: `sst2_bert:bert`) and LSTM, worst
    and best case, RL and random search against the uniform policy (part C's table)."""
    data = DataConfig(name="sst2", root=sst2_root, text=TextConfig(tokenizer=str(REPO / "sample_models/sst2_tokenizer.json")))
    dataset = load_dataset(data)
    for spec in models:
        name, _, optimize = spec.partition(":")
        model = str(REPO / f"sample_models/{name}.onnx")
        searched = [layer for layer in load_model(model, dataset.sample_shape, optimize).layers
                    if not layer.kind.weight_only and layer.kind.quantized_by_default]
        kinds = ", ".join(sorted({f"@{layer.kind.selector}" for layer in searched}))
        fused = f", fused for {optimize} by ORT's transformer optimizer" if optimize else ""
        print(f"\nD. {Path(model).name}{fused} ({len(searched)} searched layers: {kinds}; embeddings at W8, attention "
              f"products float, as quantize_dynamic's defaults), bits 2,3,4,5,6,8, budget 6 effective bits, search on "
              f"{search_limit} sentences, verification on all {len(dataset)} {dataset.name} sentences (ORT, batch size "
              f"1, {dataset.padding_note}sequence lengths as the data gives them)")
        compare_methods(model, data, [100], search_limit, out / spec.replace(":", "-"), optimize)


def compare_methods(model: str, data: DataConfig, caps: list[int], search_limit: int, out: Path,
                    optimize: str = "") -> None:
    """RL and random search at each cap: each case on ORT beside the most extreme uniform policy inside the budget,
    the evaluations spent, and the wall time of the whole search."""
    uniform_counts = {objective: len(_uniform_frontier(model, objective, load_dataset(data).sample_shape, optimize))
                      for objective in ("worst", "best")}
    print(f"{'cap':>4s} {'method':8s} {'case':6s} {'ORT acc':>8s} {'uniform':>16s} {'beyond (pts)':>12s} "
          f"{'evaluated':>9s} {'uniform':>8s} {'probes':>7s} {'minutes':>8s}")
    for cap in caps:
        for method in ("rl", "random"):
            summary, seconds = search(model, data, method, out / str(cap), max_evaluations=cap,
                                      budget_avg_bits=6.0, search_limit=search_limit, seed=0, optimize=optimize)
            for case_name in ("worst", "best"):
                case = getattr(summary, case_name)
                # + 0.0 turns -0.0 (no difference) into 0.0
                beyond = (case.uniform.ort_accuracy - case.ort_accuracy) * (100 if case_name == "worst" else -100) + 0.0
                print(f"{cap:4d} {method:8s} {case_name:6s} {100 * case.ort_accuracy:7.2f}% "
                      f"{case.uniform.label:>7s} {100 * case.uniform.ort_accuracy:7.2f}% {beyond:12.2f} "
                      f"{case.evaluations:9d} {uniform_counts[case_name]:8d} {case.sensitivity_evaluations:7d} {seconds / 60:8.1f}")


def _uniform_frontier(model_path: str, objective: str, sample_shape=None, optimize: str = "") -> list:
    """The uniform policies a search scores first (search.space.SearchSpace.uniform_frontier)."""
    model = load_model(model_path, sample_shape, optimize)
    base = load_policy("w8a8").resolve(model.layers)
    space = SearchSpace(model.layers, base, SearchConfig.bits,
                        [layer.name for layer in model.layers if not layer.kind.weight_only], 6.0)
    return space.uniform_frontier(Objective(objective))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "c", "d", "all"], default="all")
    parser.add_argument("--caps", default="100,400", help="part C: --max-evaluations values, comma-separated")
    parser.add_argument("--limit", type=int, default=2000, help="part C: CIFAR-10 images ORT verifies on")
    parser.add_argument("--search-limit", type=int, default=500, help="part C: images the simulator scores on")
    parser.add_argument("--c-models", default="digits_resnet56,cifar10_resnet20", help="part C: which models")
    parser.add_argument("--data-root", default=os.environ.get("PTQAUDIT_TEST_CIFAR10_ROOT"))
    parser.add_argument("--max-evaluations", type=int, default=400, help="per objective (the CLI default)")
    parser.add_argument("--sst2-root", default=os.environ.get("PTQAUDIT_TEST_SST2_ROOT"), help="part D: SST-2 folder")
    parser.add_argument("--text-search-limit", type=int, default=200, help="part D: sentences the simulator scores on")
    parser.add_argument("--d-models", default="sst2_bert,sst2_bert:bert,sst2_lstm",
                        help="part D: which sample text models (name:type fuses it for that transformer type first)")
    args = parser.parse_args()
    print(f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("a", "all"):
            ok = part_a(Path(tmp) / "a")
        if args.part in ("b", "all"):
            part_b(Path(tmp) / "b", args.data_root, args.max_evaluations)
        if args.part in ("c", "all"):
            part_c(Path(tmp) / "c", args.data_root, args.limit, args.search_limit, [int(c) for c in args.caps.split(",")],
                   args.c_models.split(","))
        if args.part in ("d", "all"):
            part_d(Path(tmp) / "d", args.sst2_root, args.text_search_limit, args.d_models.split(","))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
