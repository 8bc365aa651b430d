"""Benchmark: the simulator against ONNX Runtime's integer kernels, on every built-in policy, at batch
sizes 1 and 250: top-1 agreement, max and mean |logit difference|, and images/s of both engines
measured in the same run (the ratio is the simulator's speed-up over ORT's quantized graph).

    python benchmarks/bench_sim.py [--data-root DIR] [--limit N] [--batch-sizes 1,250]
        [--models ../shared/models/cifar10_resnet20.onnx,sample_models/cifar10_cnn.onnx,sample_models/digits_cnn.onnx]
    python benchmarks/bench_sim.py --models sample_models/sst2_bert.onnx,sample_models/sst2_lstm.onnx
        --sst2-root SST-2 [--padding longest|max-length] [--batch-sizes 1,32] [--optimize bert]

A text model runs on SST-2's dev split, tokenized with sample_models/sst2_tokenizer.json (or --tokenizer).

Targets: 100% agreement at W8A8, >= 99.9% for every other policy, simulator >= 5x ORT's quantized
throughput. Exit code 1 when an agreement target is missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.evaluate import evaluate
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import builtin_policy_names, load_policy
from ptqaudit.text_data import PADDINGS, TextConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [REPO.parent / "shared/models/cifar10_resnet20.onnx", REPO / "sample_models/cifar10_cnn.onnx",
                  REPO / "sample_models/digits_cnn.onnx"]


def data_for(model_path: str, args) -> DataConfig:
    """SST-2's dev split for a text model (integer inputs), digits or CIFAR-10's test split for an image model
    (by its channels)."""
    first = onnx.load(model_path, load_external_data=False).graph.input[0].type.tensor_type
    if first.elem_type != onnx.TensorProto.FLOAT:
        return DataConfig(name="sst2", root=args.sst2_root, limit=args.limit,
                          text=TextConfig(tokenizer=args.tokenizer, padding=args.padding))
    return DataConfig(name="digits" if first.shape.dim[1].dim_value == 1 else "cifar10", root=args.data_root,
                      limit=args.limit)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(str(p) for p in DEFAULT_MODELS))
    parser.add_argument("--data-root", default=os.environ.get("PTQAUDIT_TEST_CIFAR10_ROOT"))
    parser.add_argument("--batch-sizes", default="1,250")
    parser.add_argument("--limit", type=int, default=None, help="class-balanced subset of the test split")
    parser.add_argument("--sst2-root", default=os.environ.get("PTQAUDIT_TEST_SST2_ROOT"), help="text models' data")
    parser.add_argument("--tokenizer", default=str(REPO / "sample_models/sst2_tokenizer.json"))
    parser.add_argument("--padding", default=TextConfig.padding, choices=PADDINGS)
    parser.add_argument("--optimize", default="", help="fuse the models with ORT's transformer optimizer first (e.g. bert)")
    args = parser.parse_args()

    print(f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, numpy {np.__version__}")
    policies = [load_policy(name) for name in builtin_policy_names()]
    missed, speedups = [], []
    started = time.perf_counter()
    for model_path in args.models.split(","):
        dataset = load_dataset(data_for(model_path, args))
        model = load_model(model_path, dataset.sample_shape, args.optimize)
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            fused = f" fused for {args.optimize}" if args.optimize else ""
            print(f"\n{Path(model_path).name}{fused} on {dataset.name} ({len(dataset)} {dataset.unit}, "
                  f"{dataset.padding_note}batch size {batch_size})")
            print(f"{'policy':22s} {'ORT acc':>8s} {'sim = ORT':>10s} {'max|dlogit|':>12s} {'mean|dlogit|':>13s} "
                  f"{'ORT img/s':>10s} {'sim img/s':>10s} {'sim/ORT':>8s}")
            report = evaluate(model, dataset, policies, batch_size=batch_size, engine="both", progress=False)
            rows = [("fp32", report.fp32_accuracy, report.fp32_sim, report.fp32_images_per_second)]
            rows += [(r.policy, r.accuracy, r.sim, r.images_per_second) for r in report.results]
            for name, acc, sim, ort_speed in rows:
                ratio = sim.images_per_second / ort_speed
                print(f"{name:22s} {100 * acc:7.2f}% {100 * sim.top1_agreement_with_ort:9.2f}% "
                      f"{sim.max_abs_logit_diff:12.3g} {sim.mean_abs_logit_diff:13.3g} {ort_speed:10.0f} "
                      f"{sim.images_per_second:10.0f} {ratio:7.2f}x")
                target = 1.0 if name == "w8a8" else 0.999
                if sim.top1_agreement_with_ort < target:
                    missed.append(f"{Path(model_path).name} bs{batch_size} {name}: {100 * sim.top1_agreement_with_ort:.2f}%")
                if name != "fp32":
                    speedups.append(ratio)
    print(f"\nsimulator speed-up over ORT's quantized graphs: geometric mean {np.exp(np.mean(np.log(speedups))):.2f}x, "
          f"worst {min(speedups):.2f}x, best {max(speedups):.2f}x over {len(speedups)} runs")
    print("agreement targets: " + ("all met" if not missed else "missed for " + "; ".join(missed)))
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
