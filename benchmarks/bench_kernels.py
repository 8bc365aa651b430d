"""Benchmark: kernel families. Per model and built-in policy: accuracy under each kernel family (ORT's own
kernels for this machine's family, the simulator's emulation for the others), how many logits the avx2-u8s8
saturation changes against exact int32, the emulation's agreement with ORT for this machine's family, and
the simulator's speed with the saturating emulation against exact (the baseline), measured in one run.

    python benchmarks/bench_kernels.py [--data-root DIR] [--limit N] [--batch-sizes 1,250] [--batch1-limit 2000]
        [--repeats 3]
        [--models ../shared/models/cifar10_resnet20.onnx,sample_models/cifar10_cnn.onnx,sample_models/digits_cnn.onnx]

Targets: the emulation of this machine's family agrees with ORT on 100% of top-1 predictions and gives its
logits bit for bit; the saturating emulation is less than 1.5x slower than exact. Exit code 1 when a target
is missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ptqaudit.data import DataConfig, Dataset, load_dataset
from ptqaudit.evaluate import make_session, predict
from ptqaudit.kernels import AVX2_U8S8, EXACT, KERNEL_FAMILIES, cpu_description, detect_kernel_family
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import builtin_policy_names, load_policy
from ptqaudit.predictions import Predictions, accuracy
from ptqaudit.quantize import quantize
from ptqaudit.sim.engine import EngineAgreement, sim_predict, simulation_plan
from ptqaudit.sim.model import SimModel

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [REPO.parent / "shared/models/cifar10_resnet20.onnx", REPO / "sample_models/cifar10_cnn.onnx",
                  REPO / "sample_models/digits_cnn.onnx"]
SLOWDOWN_TARGET = 1.5
POLICY_WIDTH = 22


def table_line(groups: list[list[tuple[str, int]]]) -> str:
    """One table row: groups of (cell, width) cells, right-aligned, groups two spaces apart."""
    return "  ".join(" ".join(cell.rjust(width) for cell, width in group) for group in groups).rstrip()


def sim_families(sims: dict[str, SimModel], dataset: Dataset, policy, batch_size: int,
                 repeats: int) -> dict[str, Predictions]:
    """Every family's simulator on the same batches as ORT. The families take turns batch by batch, in
    alternating order, and each batch runs `repeats` times with the fastest time kept, so that other jobs'
    load on the machine falls on all families alike and passes interrupted by them do not count."""
    _, chunk = simulation_plan(batch_size)
    logits: dict[str, list[np.ndarray]] = {family: [] for family in sims}
    seconds = dict.fromkeys(sims, 0.0)
    order = list(sims)
    for i, (x, y) in enumerate(dataset.batches(chunk)):
        part = Dataset(dataset.name, x, y, dataset.classes)
        fastest = dict.fromkeys(sims, float("inf"))
        for repeat in range(repeats):
            for family in order if (i + repeat) % 2 == 0 else order[::-1]:
                run = sim_predict(sims[family], part, policy, batch_size, progress=False)
                fastest[family] = min(fastest[family], run.seconds)
                if repeat == 0:
                    logits[family].append(run.logits)
        for family in sims:
            seconds[family] += fastest[family]
    return {family: Predictions(np.concatenate(logits[family]), seconds[family]) for family in sims}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(str(p) for p in DEFAULT_MODELS))
    parser.add_argument("--data-root", default=os.environ.get("PTQAUDIT_TEST_CIFAR10_ROOT"),
                        help="folder holding cifar-10-batches-py")
    parser.add_argument("--limit", type=int, default=None, help="class-balanced subset of the test split (default: all)")
    parser.add_argument("--batch-sizes", default="1,250")
    parser.add_argument("--batch1-limit", type=int, default=2000,
                        help="class-balanced subset for batch size 1, where ORT runs one image per call (0: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="simulator runs per batch and family; the fastest is timed (the logits are the same)")
    args = parser.parse_args()

    native = detect_kernel_family()
    print(f"hardware: {cpu_description()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"numpy {np.__version__}")
    print(f"kernel family of this machine (probe): {native}")
    for family, description in KERNEL_FAMILIES.items():
        print(f"  {family:10s} {'ORT on this machine' if family == native else 'simulator emulation':20s} {description}")

    families = list(KERNEL_FAMILIES)
    labels = [f"{family} ({'ORT' if family == native else 'emu'})" for family in families]
    widths = [max(8, len(label)) for label in labels]
    columns = [
        [("policy", POLICY_WIDTH)], list(zip(labels, widths)),
        [("logits changed", 17), ("top-1", 6)], [("top-1", 8), ("logits !=", 9), ("max|d|", 8)],
        [(EXACT, 8), (AVX2_U8S8, 9), ("slower", 7)],
    ]
    titles = ["", "accuracy", f"{AVX2_U8S8} vs {EXACT} (sim)", f"emulated {native} vs ORT", "simulator images/s"]
    group_widths = [sum(w for _, w in group) + len(group) - 1 for group in columns]
    missed, slowdowns = [], []
    agreement_runs = bitwise_runs = 0
    started = time.perf_counter()
    for model_path in args.models.split(","):
        model = load_model(model_path)
        sims = {family: SimModel(model, kernel_family=family).eval() for family in families}
        data = "digits" if model.input_shape[1] == 1 else "cifar10"
        full = load_dataset(DataConfig(name=data, root=args.data_root, limit=args.limit))
        policies = [(name, load_policy(name).resolve(model.layers)) for name in builtin_policy_names()]
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            dataset = full.subset(args.batch1_limit) if batch_size == 1 and args.batch1_limit else full
            subset_note = f", a class-balanced subset of {len(full)}" if len(dataset) < len(full) else ""
            print(f"\n{Path(model_path).name} on {dataset.name} ({len(dataset)} images{subset_note}), batch size {batch_size}")
            print(table_line([[(title.center(width), width)] for title, width in zip(titles, group_widths)]))
            print(table_line([[(columns[0][0][0].ljust(POLICY_WIDTH), POLICY_WIDTH)]] + columns[1:]))

            ort_fp32 = predict(make_session(model.proto), dataset, batch_size, "fp32", progress=False, model=model_path)
            fp32_accuracy = accuracy(ort_fp32.labels, dataset.y)
            # fp32 runs no integer kernel: ORT's one number holds for every family; the simulator's float ops
            # beside ORT's show what the quantized rows' differences owe to float arithmetic
            sim_fp32 = sim_predict(sims[native], dataset, None, batch_size, progress=False)
            agreement = EngineAgreement.between(ort_fp32, sim_fp32)
            print(table_line([
                [("fp32".ljust(POLICY_WIDTH), POLICY_WIDTH)], [(f"{100 * fp32_accuracy:.2f}%", w) for w in widths],
                [("", 17), ("", 6)],
                [(f"{100 * agreement.top1_agreement:.2f}%", 8), (str(int(np.sum(ort_fp32.logits != sim_fp32.logits))), 9),
                 (f"{agreement.max_abs_logit_diff:.2g}", 8)],
            ]))
            for family in families:  # warm-up: first calls pay one-off costs (thread pools, kernel selection)
                sim_predict(sims[family], dataset.subset(batch_size), None, batch_size, progress=False)

            for name, policy in policies:
                ort_run = predict(make_session(quantize(model, policy)), dataset, batch_size, name,
                                  progress=False, model=model_path)
                runs = sim_families(sims, dataset, policy, batch_size, args.repeats)
                accuracies = [accuracy((ort_run if f == native else runs[f]).labels, dataset.y) for f in families]
                saturated, exact = runs[AVX2_U8S8], runs[EXACT]
                changed = int(np.sum(saturated.logits != exact.logits))
                moved = int(np.sum(saturated.labels != exact.labels))
                emulation = runs[native]
                agreement = EngineAgreement.between(ort_run, emulation)
                differing = int(np.sum(ort_run.logits != emulation.logits))
                slowdown = saturated.seconds / exact.seconds
                slowdowns.append(slowdown)
                agreement_runs += 1
                bitwise_runs += differing == 0
                print(table_line([
                    [(name.ljust(POLICY_WIDTH), POLICY_WIDTH)], [(f"{100 * a:.2f}%", w) for a, w in zip(accuracies, widths)],
                    [(f"{changed} ({100 * changed / saturated.logits.size:.2f}%)", 17), (str(moved), 6)],
                    [(f"{100 * agreement.top1_agreement:.2f}%", 8), (str(differing), 9),
                     (f"{agreement.max_abs_logit_diff:.2g}", 8)],
                    [(f"{exact.images_per_second():.0f}", 8), (f"{saturated.images_per_second():.0f}", 9),
                     (f"{slowdown:.2f}x", 7)],
                ]))
                where = f"{Path(model_path).name} bs{batch_size} {name}"
                if agreement.top1_agreement < 1.0:
                    missed.append(f"{where}: top-1 {100 * agreement.top1_agreement:.2f}%")
                if differing:
                    missed.append(f"{where}: {differing} logits differ from ORT")
                if slowdown >= SLOWDOWN_TARGET:
                    missed.append(f"{where}: {slowdown:.2f}x slower")

    print(f"\nemulation of {native} against ORT: bitwise logits in {bitwise_runs} of {agreement_runs} runs")
    print(f"saturating emulation ({AVX2_U8S8}) against {EXACT}, same policy and batches: geometric mean "
          f"{np.exp(np.mean(np.log(slowdowns))):.2f}x slower, worst {max(slowdowns):.2f}x, best {min(slowdowns):.2f}x "
          f"over {len(slowdowns)} runs (target < {SLOWDOWN_TARGET}x)")
    print("targets: " + ("all met" if not missed else f"missed {len(missed)}: " + "; ".join(missed)))
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
