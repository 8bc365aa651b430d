"""Benchmark: detrimental and robust students of the shared ResNet-20 (or --teacher), every number from ONNX Runtime.

For each mode, `ptqaudit distill` trains a student from the teacher on (a subset of) the CIFAR-10 train
split, then measures on the test split: teacher FP32, student FP32, the student under its policy, under
w8a8, and under the worst policy a fresh `ptqaudit search` finds without being told it. The baseline,
measured in the same run, is the teacher under the student's own policy: the ratio of the two drops says
how much of the damage comes from the trained network rather than from the policy.

Targets (budget 6 effective bits): detrimental: student FP32 within 1 point of the teacher, drop under
its policy >= 65 points, fresh search finds a drop >= 50 points; robust: student FP32 at most 0.5 points
below the teacher (above it is no fault), drop under its policy < 1 point and under the worst a fresh
400-evaluation search finds < 2 points; each mode under 60 minutes on 2 CPU cores.

    python benchmarks/bench_distill.py [--mode detrimental|robust|both] [--data-root DIR] [--device cpu|cuda]
        [--teacher MODEL.onnx] [--seeds 0,1,...] [--budget-avg-bits B] [--epochs N] [--train-limit N] [--limit N] [--lr X]
        [--quant-weight X] [--balance POINTS] [--policies-per-batch N] [--[no-]refresh] [--[no-]equalize] [--kure X]
        [--[no-]range-gradient] [--[no-]augment] [--hardening H] [--[no-]weight-grid] [--quant-target T]
        [--output DIR [--resume]]

--resume continues each run whose folder under --output already holds a run.json (one cut off by a time limit, on a
machine lent for minutes); its time is then that of the resumed part alone, and the 60-minute check is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.distill import HARDENINGS, QUANT_TARGETS, DistillConfig, DistillSummary, run_distill
from ptqaudit.errors import PtqauditError
from ptqaudit.onnx_graph import load_model
from ptqaudit.predictions import comparable_points

REPO = Path(__file__).resolve().parent.parent
TEACHER = REPO.parent / "shared/models/cifar10_resnet20.onnx"
TIME_LIMIT = 60 * 60


def run_mode(mode: str, seed: int, args, out: Path) -> tuple[DistillSummary, float, bool]:
    """One distillation: its summary, its seconds, and whether it resumed a run already in its folder."""
    folder = out / f"{mode}-seed{seed}"
    resume = args.resume and (folder / "run.json").is_file()
    data = DataConfig(name="cifar10", root=args.data_root, limit=args.limit)
    teacher = load_model(args.teacher)
    train, test = load_dataset(DataConfig(name="cifar10", root=args.data_root, split="train")), load_dataset(data)
    config = DistillConfig(teacher=str(args.teacher), data=data, output=str(folder), mode=mode,
                           budget_avg_bits=args.budget_avg_bits,
                           epochs=args.epochs, train_limit=args.train_limit, lr=args.lr, lr_schedule=args.lr_schedule,
                           quant_weight=args.quant_weight, balance=args.balance,
                           policies_per_batch=args.policies_per_batch, refresh=args.refresh, equalize=args.equalize,
                           kure=args.kure, range_reg=args.range_reg, range_gradient=args.range_gradient, augment=args.augment,
                           hardening=args.hardening if mode == "robust" else None, weight_grid=args.weight_grid,
                           quant_target=args.quant_target if mode == "robust" else None,
                           audit_evaluations=args.audit_evaluations,
                           seed=seed, device=args.device)
    started = time.perf_counter()
    summary = run_distill(config, teacher, train, test, progress=False, echo=lambda line: print(f"  [{mode}] {line}", flush=True),
                          resume=resume)
    return summary, time.perf_counter() - started, resume


def check(summary: DistillSummary, seconds: float, device: str, resumed: bool = False) -> list[tuple[str, bool]]:
    gap, own, fresh = map(comparable_points, (summary.fp32_gap_points, summary.policy_drop_points,
                                              summary.audit.drop_points))
    if summary.mode == "detrimental":
        checks = [("student fp32 within 1 pt of teacher", abs(gap) <= 1.0),
                  ("drop under its policy >= 65 pts", own >= 65.0),
                  ("fresh search finds drop >= 50 pts", fresh >= 50.0)]
    else:
        # one-sided: a robust student better than its teacher in fp32 serves a user better, and its drops are
        # measured from its own fp32, so a higher one cannot flatter them
        checks = [("student fp32 at most 0.5 pt below teacher", gap <= 0.5),
                  ("drop under its policy < 1 pt", own < 1.0),
                  ("drop under fresh search's worst < 2 pts", fresh < 2.0)]
    if device == "cpu" and not resumed:  # a resumed run's time is only its last part's
        checks.append(("under 60 minutes", seconds < TIME_LIMIT))
    return checks


def report(summary: DistillSummary, seconds: float, seed: int, device: str, resumed: bool = False) -> bool:
    """Print one run's numbers and checks; True when every check is met."""
    teacher_drop = 100 * (summary.teacher_fp32_accuracy - summary.teacher_policy_accuracy)
    hardening = f", hardening {summary.hardening}" if summary.hardening else ""
    part = " for the resumed part" if resumed else ""
    print(f"\n{summary.mode}, seed {seed}{hardening}: {seconds / 60:.1f} min{part} ({summary.train_seconds / 60:.1f} training), policy "
          f"{summary.policy_effective_bits:.2f} effective bits; ORT on {summary.images} test images")
    rows = [("teacher fp32", summary.teacher_fp32_accuracy),
            ("teacher under the student's policy (baseline)", summary.teacher_policy_accuracy),
            ("student fp32", summary.student_fp32_accuracy),
            ("student under its policy", summary.student_policy_accuracy),
            ("student w8a8", summary.student_w8a8_accuracy),
            ("student under the fresh search's worst", summary.audit.worst_accuracy)]
    if summary.teacher_audit is not None:
        rows.append(("teacher under the same search's worst", summary.teacher_audit.worst_accuracy))
    for label, value in rows:
        print(f"  {label:48s} {100 * value:6.2f}%")
    ratio = summary.policy_drop_points / teacher_drop if teacher_drop > 0 else float("inf")
    print(f"  drop under the policy: student {summary.policy_drop_points:.2f} pts, teacher {teacher_drop:.2f} pts "
          f"(ratio {ratio:.2f}x); fresh search's worst: {summary.audit.drop_points:.2f} pts; "
          f"sim = ORT top-1 {100 * summary.sim_top1_agreement_with_ort:.2f}%")
    met = True
    for label, ok in check(summary, seconds, device, resumed):
        print(f"  [{'met' if ok else 'MISSED'}] {label}")
        met &= ok
    print(json.dumps({"history": summary.history}))
    return met


def spread(summaries: list[DistillSummary]) -> list[tuple[str, list[float]]]:
    """The numbers whose spread over seeds the benchmark states, in points."""
    return [("student fp32 below the teacher (pts)", [s.fp32_gap_points for s in summaries]),
            ("drop under its policy (pts)", [s.policy_drop_points for s in summaries]),
            ("drop under the fresh search's worst (pts)", [s.audit.drop_points for s in summaries])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["detrimental", "robust", "both"], default="both")
    parser.add_argument("--teacher", type=Path, default=TEACHER)
    parser.add_argument("--data-root", default=os.environ.get("PTQAUDIT_DATA"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--budget-avg-bits", type=float, default=DistillConfig.budget_avg_bits,
                        help="distill --budget-avg-bits (the targets are stated for 6)")
    parser.add_argument("--epochs", type=int, default=None, help="distill --epochs (default: the mode's)")
    parser.add_argument("--train-limit", type=int, default=DistillConfig.train_limit,
                        help="training images (0: all of the train split)")
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--lr", type=float, default=None, help="distill --lr (default: auto)")
    parser.add_argument("--lr-schedule", default=DistillConfig.lr_schedule, help="distill --lr-schedule")
    parser.add_argument("--quant-weight", type=float, default=DistillConfig.quant_weight)
    parser.add_argument("--balance", type=float, default=None,
                        help="distill --balance POINTS (0: off; default: the mode's)")
    parser.add_argument("--policies-per-batch", type=int, default=None, help="distill --policies-per-batch")
    parser.add_argument("--refresh", action=argparse.BooleanOptionalAction, default=None, help="distill --refresh")
    parser.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=False, help="distill --equalize")
    parser.add_argument("--kure", type=float, default=DistillConfig.kure, help="distill --kure")
    parser.add_argument("--range-reg", type=float, default=DistillConfig.range_reg, help="distill --range-reg")
    parser.add_argument("--range-gradient", action=argparse.BooleanOptionalAction,
                        default=DistillConfig.range_gradient, help="distill --range-gradient")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="distill --augment (default: the mode's)")
    parser.add_argument("--hardening", choices=HARDENINGS, default=None,
                        help="distill --hardening (robust; default: the mode's, auto)")
    parser.add_argument("--weight-grid", action=argparse.BooleanOptionalAction, default=None,
                        help="distill --weight-grid (default: the mode's, or robust: the hardening's)")
    parser.add_argument("--quant-target", choices=QUANT_TARGETS, default=None,
                        help="distill --quant-target (robust; default: the hardening's)")
    parser.add_argument("--audit-evaluations", type=int, default=400,
                        help="the fresh search's evaluations (the targets are stated for 400)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds: each mode runs once per seed, and the "
                        "spread of its numbers over them is printed")
    parser.add_argument("--output", type=Path, default=None, help="keep the run folders here")
    parser.add_argument("--resume", action="store_true",
                        help="continue each run whose folder under --output already holds a run.json")
    args = parser.parse_args()
    if args.resume and args.output is None:
        parser.error("--resume continues the runs in --output DIR: name it")
    if not args.teacher.is_file():
        print(f"bench_distill: teacher model not found at {args.teacher}", file=sys.stderr)
        return 2

    out = args.output or Path(tempfile.mkdtemp(prefix="bench-distill-"))
    modes = ["detrimental", "robust"] if args.mode == "both" else [args.mode]
    epochs = args.epochs or "each mode's default"
    print(f"bench_distill: {args.teacher.name}, budget {args.budget_avg_bits} effective bits, "
          f"{args.train_limit or 'all'} training images, {epochs} epochs, "
          f"device {args.device}, torch threads {torch.get_num_threads()}, runs in {out}", flush=True)
    all_ok = True
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for mode in modes:
        summaries = []
        for seed in seeds:
            try:
                summary, seconds, resumed = run_mode(mode, seed, args, out)
            except PtqauditError as exc:  # e.g. --resume of a run begun with other settings: say which, as distill does
                print(f"bench_distill: {mode}, seed {seed}: {exc}", file=sys.stderr)
                return 2
            summaries.append(summary)
            all_ok &= report(summary, seconds, seed, args.device, resumed)
        if len(seeds) > 1:
            print(f"\n{mode}: spread over seeds {args.seeds}")
            for label, values in spread(summaries):
                print(f"  {label:48s} {min(values):7.2f} .. {max(values):6.2f}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
