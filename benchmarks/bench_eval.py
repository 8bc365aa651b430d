"""Benchmark: FP32 and per-policy accuracy and images/s on ONNX Runtime, and ptqaudit's W8A8 graph
against a direct onnxruntime.quantization.quantize_dynamic run with its defaults (must agree 100%), in one run;
for a text model also W8A8 with the attention MatMuls quantized against quantize_dynamic with MatMulConstBOnly off.

    python benchmarks/bench_eval.py [--model ../shared/models/cifar10_resnet20.onnx]
        [--data cifar10 --data-root DIR] [--batch-size 250] [--limit N] [--threads 0]
    python benchmarks/bench_eval.py --model sample_models/sst2_bert.onnx --data sst2 --data-root SST-2
        --tokenizer sample_models/sst2_tokenizer.json [--padding longest|max-length] [--batch-size 1] [--optimize bert]

Speeds are printed as a ratio to the FP32 baseline measured in the same run on the same data.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.evaluate import evaluate, make_session, predict
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import builtin_policy_names, load_policy, parse_policy
from ptqaudit.quantize import quantize
from ptqaudit.text_data import PADDINGS, TextConfig

REPO = Path(__file__).resolve().parent.parent


ATTENTION_W8A8 = {"default": {"weight_bits": 8, "activation_bits": 8}, "layers": {"@attention": {}}}


def direct_quantize_dynamic(model: onnx.ModelProto, **extra_options) -> onnx.ModelProto:
    """What a user gets from ORT's own tool with its defaults (int8 weights, every op type it quantizes); on a
    graph with contrib ops (--optimize) with the DefaultTensorType it then needs."""
    if any(node.domain == "com.microsoft" for node in model.graph.node):
        extra_options["DefaultTensorType"] = onnx.TensorProto.FLOAT
    with tempfile.TemporaryDirectory() as tmp:
        out, source = Path(tmp) / "direct.onnx", Path(tmp) / "model.onnx"
        onnx.save(model, str(source))
        logging.disable(logging.WARNING)  # its advice to pre-process the model
        quantize_dynamic(source, out, weight_type=QuantType.QInt8, extra_options=extra_options)
        logging.disable(logging.NOTSET)
        return onnx.load(str(out))


def compare(label: str, model, policy, direct: onnx.ModelProto, dataset, args) -> bool:
    """ptqaudit's graph for `policy` against a direct quantize_dynamic graph on the same inputs."""
    ours = predict(make_session(quantize(model, policy.resolve(model.layers)), threads=args.threads), dataset,
                   args.batch_size, label, progress=False)
    theirs = predict(make_session(direct, threads=args.threads), dataset, args.batch_size, "direct", progress=False)
    agreement = float(np.mean(ours.labels == theirs.labels))
    print(f"ptqaudit {label} vs direct quantize_dynamic: top-1 agreement {100 * agreement:.2f}% "
          f"(ratio {agreement:.4f}), logits bitwise identical: {bool(np.array_equal(ours.logits, theirs.logits))}, "
          f"max |logit diff| {np.abs(ours.logits - theirs.logits).max():.3g}")
    return agreement == 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO.parent / "shared/models/cifar10_resnet20.onnx"))
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--data-root", default=os.environ.get("PTQAUDIT_TEST_CIFAR10_ROOT"))
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="text data: the model's tokenizer.json")
    parser.add_argument("--padding", default=TextConfig.padding, choices=PADDINGS)
    parser.add_argument("--max-length", type=int, default=TextConfig.max_length)
    parser.add_argument("--optimize", default="", help="fuse the model with ORT's transformer optimizer first (e.g. bert)")
    args = parser.parse_args()

    text = TextConfig(tokenizer=args.tokenizer, padding=args.padding, max_length=args.max_length)
    dataset = load_dataset(DataConfig(name=args.data, root=args.data_root, limit=args.limit, text=text))
    model = load_model(args.model, dataset.sample_shape, args.optimize)
    fused = f", fused for {args.optimize} by ORT's transformer optimizer" if args.optimize else ""
    print(f"model {args.model} ({len(model.layers)} quantizable layers{fused})")
    print(f"data {dataset.name}: {len(dataset)} {dataset.unit}, {dataset.padding_note}batch size {args.batch_size}")
    print(f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"python {platform.python_version()}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}")

    started = time.perf_counter()
    policies = [load_policy(name) for name in builtin_policy_names()]
    report = evaluate(model, dataset, policies, batch_size=args.batch_size, threads=args.threads, progress=False)
    print(f"\n{'policy':22s} {'accuracy':>9s} {'drop':>7s} {'agree':>8s} {'images/s':>9s} {'speed vs fp32':>14s}  built by")
    print(f"{'fp32':22s} {100 * report.fp32_accuracy:8.2f}% {'':>7s} {'':>8s} {report.fp32_images_per_second:9.0f} {1.0:13.2f}x")
    for r in report.results:
        print(f"{r.policy:22s} {100 * r.accuracy:8.2f}% {r.drop_points:+7.2f} {100 * r.agreement_with_fp32:7.2f}% "
              f"{r.images_per_second:9.0f} {r.images_per_second / report.fp32_images_per_second:13.2f}x  {r.method}")

    print()
    same = compare("w8a8", model, load_policy("w8a8"), direct_quantize_dynamic(model.proto), dataset, args)
    if any(layer.kind.selector == "attention" for layer in model.layers):
        same &= compare("w8a8 + attention MatMuls", model, parse_policy(ATTENTION_W8A8, "w8a8-attention", "bench"),
                        direct_quantize_dynamic(model.proto, MatMulConstBOnly=False), dataset, args)
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
