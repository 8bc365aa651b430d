"""Rebuilds ptqaudit's sample ONNX models (digits_cnn, digits_resnet56, cifar10_cnn) deterministically from their data.

Usage:
    python sample_models/build.py digits|digits-resnet56|cifar10|all [--cifar10-root DIR] [--out DIR]

Each model is trained from fixed seeds on CPU, exported with the TorchScript-based
ONNX exporter (opset 17, input `input` with a dynamic `batch` dimension, output
`logits`), checked with onnx.checker, and scored by onnxruntime on the exported
file. The accuracy printed is measured on that file, not on the PyTorch model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing the package

from ptqaudit.data import DataConfig, Dataset, load_dataset  # noqa: E402
from ptqaudit.errors import PtqauditError  # noqa: E402

SEED = 0
OPSET = 17
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")

# CIFAR-10 training-set channel statistics; normalisation lives inside the graph,
# so users feed float32 NCHW images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------- data


def load_split(name: str, split: str, root: str | None = None) -> Dataset:
    """One split ("train" | "test") of "digits" or "cifar10", by the project's own loader.

    `.x` is float32 NCHW in [0, 1], `.y` int64. digits is split exactly as
    train_test_split(test_size=0.3, stratify=y, random_state=0) does; cifar10 is read
    from a standard cifar-10-batches-py folder (`root` or the folder that holds it).
    """
    return load_dataset(DataConfig(name=name, root=root, split=split))


# --------------------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    """8x8 digits: 2 Conv, 1 Gemm and 1 plain MatMul, so every quantizable op type appears."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, hidden)  # 2-D input: exports as Gemm
        self.w = nn.Parameter(torch.randn(hidden, 10) / hidden**0.5)  # exports as MatMul + Add
        self.b = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 32 x 4 x 4
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return x @ self.w + self.b


class Cifar10CNN(nn.Module):
    """CIFAR-10: in-graph Sub/Div normalisation, 3 x (Conv-BN-ReLU-MaxPool), Linear.

    BatchNorm is folded into the convolutions by the exporter (eval mode), so the ONNX
    graph holds Sub, Div, 3 x (Conv, Relu, MaxPool), Flatten, Gemm.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
        c1, c2, c3 = widths
        self.conv1, self.bn1 = nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2)
        self.conv3, self.bn3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # 16 x 16
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 8 x 8
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # 4 x 4
        return self.fc(torch.flatten(x, 1))


class ResidualBlock(nn.Module):
    """Two Conv-BN(-ReLU) with an identity shortcut; where the block downsamples, the shortcut takes every
    other pixel and zero-pads the new channels ("option A"), so every quantizable layer is a 3x3 conv."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.pad = channels_out - channels_in
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet-(6n+2) of He et al. 2016 for small images (option-A shortcuts): a stem conv, three stages of
    n residual blocks (the 2nd and 3rd halve the resolution), global average pooling and one Gemm, so
    6n + 1 convs and a Gemm are quantizable. n = 9 gives ResNet-56: 56 layers, the depth the search
    has to scale to. Normalisation, if any, lives inside the graph."""

    def __init__(self, in_channels: int, blocks_per_stage: int, widths: tuple[int, int, int],
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.normalise = mean is not None
        if self.normalise:
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.conv1, self.bn1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0])
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                blocks.append(ResidualBlock(channels, width, 2 if stage > 0 and index == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            x = (x - self.mean) / self.std
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits_resnet56() -> ResNet:
    """8x8 digits, 56 quantizable layers (widths 16, 32, 64 at 8x8, 4x4, 2x2): a deep model that trains in
    a minute on a CPU, where a CIFAR-10 ResNet-56 takes an hour per epoch on two cores."""
    return ResNet(1, 9, (16, 32, 64))


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float  # peak learning rate of the one-cycle schedule
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adam"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = False  # random crop (pad 4, reflect) + horizontal flip
    channels_last: bool = False  # faster convolutions on CPU


def augment_batch(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random crop of a reflect-padded image and a random horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    dy = rng.integers(0, 2 * pad + 1, size=n)
    dx = rng.integers(0, 2 * pad + 1, size=n)
    flip = rng.random(n) < 0.5
    out = np.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, :, ::-1] if flip[i] else crop
    return out


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, seed: int = SEED) -> nn.Module:
    """Trains in place with a one-cycle learning rate; prints one line per epoch."""
    rng = np.random.default_rng(seed)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(data.y)
    steps_per_epoch = n // cfg.batch_size  # drop the last partial batch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
    )
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        loss_sum, correct, seen = 0.0, 0, 0
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            xb = data.x[idx]
            if cfg.augment:
                xb = augment_batch(xb, rng)
            xb = torch.from_numpy(np.ascontiguousarray(xb)).contiguous(memory_format=fmt)
            yb = torch.from_numpy(data.y[idx])
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        print(
            f"  epoch {epoch:2d}/{cfg.epochs}  loss {loss_sum / seen:.4f}  "
            f"train acc {100 * correct / seen:5.2f}%  {time.perf_counter() - t0:5.1f}s",
            flush=True,
        )
    return model.to(memory_format=torch.contiguous_format).eval()


# --------------------------------------------------------------------------- export


def export_onnx(model: nn.Module, sample: torch.Tensor, path: Path) -> onnx.ModelProto:
    """Exports with the TorchScript exporter (dynamo=False), checks, writes atomically."""
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 flags the TorchScript exporter as legacy (DeprecationWarning); it
            # still works, needs no onnxscript and names nodes after modules (/conv1/Conv).
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (sample,),
                tmp,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,  # with eval mode, also folds BatchNorm into Conv
                dynamo=False,
            )
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto, full_check=True)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return proto


def ort_accuracy(path: Path, data: Dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of the ONNX file on a split, computed by onnxruntime on CPU."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for s in range(0, len(data.y), batch_size):
        (logits,) = sess.run(["logits"], {"input": data.x[s : s + batch_size]})
        correct += int((logits.argmax(1) == data.y[s : s + batch_size]).sum())
    return 100.0 * correct / len(data.y)


def describe(proto: onnx.ModelProto) -> str:
    ops = [n.op_type for n in proto.graph.node]
    layers = [n.name for n in proto.graph.node if n.op_type in QUANTIZABLE_OPS]
    return f"{len(layers)} quantizable layers ({', '.join(layers)}); op types: {sorted(set(ops))}"


# --------------------------------------------------------------------------- recipes


def seed_everything(seed: int = SEED) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


# name -> (file, model factory, training recipe)
RECIPES: dict[str, tuple[str, Callable[[], nn.Module], TrainConfig]] = {
    "digits": (
        "digits_cnn.onnx",
        DigitsCNN,
        TrainConfig(epochs=30, batch_size=32, lr=3e-3, optimizer="adam", weight_decay=1e-4),
    ),
    "digits-resnet56": (
        "digits_resnet56.onnx",
        digits_resnet56,
        TrainConfig(epochs=30, batch_size=32, lr=0.05, optimizer="sgd", weight_decay=5e-4),
    ),
    "cifar10": (
        "cifar10_cnn.onnx",
        Cifar10CNN,
        TrainConfig(
            epochs=12, batch_size=256, lr=0.2, optimizer="sgd", weight_decay=5e-4,
            label_smoothing=0.1, augment=True, channels_last=True,
        ),
    ),
}


def build(name: str, out: Path, cifar10_root: str | None) -> float:
    """Trains, exports and scores one sample model; returns its ORT FP32 test accuracy (%)."""
    filename, factory, cfg = RECIPES[name]
    data = name.split("-")[0]  # the recipe's data set: "digits" or "cifar10"
    root = cifar10_root if data == "cifar10" else None
    t0, cpu0 = time.perf_counter(), time.process_time()
    seed_everything()
    model = factory()
    train_split, test_split = load_split(data, "train", root), load_split(data, "test", root)
    print(f"[{name}] {len(train_split)} train / {len(test_split)} test images; {cfg}", flush=True)
    t_train, cpu_train = time.perf_counter(), time.process_time()
    train(model, train_split, cfg)
    train_s, train_cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train
    path = out / filename
    proto = export_onnx(model, torch.from_numpy(test_split.x[:2]), path)
    acc = ort_accuracy(path, test_split)
    print(f"[{name}] wrote {path} ({path.stat().st_size / 1024:.1f} KB); {describe(proto)}")
    print(
        f"[{name}] FP32 test accuracy (onnxruntime on the file, {len(test_split)} images): {acc:.2f}%"
    )
    print(
        f"[{name}] training {train_s:.1f}s wall ({train_cpu_s:.1f}s CPU, {torch.get_num_threads()} threads); "
        f"whole build {time.perf_counter() - t0:.1f}s wall ({time.process_time() - cpu0:.1f}s CPU)",
        flush=True,
    )
    return acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=[*RECIPES, "all"])
    p.add_argument(
        "--cifar10-root",
        default=None,
        help="cifar-10-batches-py folder or the folder holding it (default: $PTQAUDIT_DATA, then the cache)",
    )
    p.add_argument("--out", type=Path, default=HERE, help="output folder (default: sample_models/)")
    args = p.parse_args(argv)
    print(
        f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
        f"numpy {np.__version__}; seed {SEED}",
        flush=True,
    )
    try:
        for name in list(RECIPES) if args.model == "all" else [args.model]:
            build(name, args.out, args.cifar10_root)
    except PtqauditError as exc:
        hint = " (this script's flag is --cifar10-root)" if "--data-root" in str(exc) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
