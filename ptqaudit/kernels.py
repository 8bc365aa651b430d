"""Kernel families: which integer arithmetic ONNX Runtime's CPU kernels really do on a given machine.

ORT's u8 x s8 matrix kernels are not exact on every CPU. On x86-64 with AVX2 but no VNNI, MLAS multiplies
with `vpmaddubsw`, which adds the products of consecutive pairs along K and saturates each pair sum to int16
before the int32 accumulation; VNNI, AMX and ARM dot-product kernels accumulate exactly in int32. ConvInteger
(im2col, then a u8 x u8 GEMM) is exact on both. A family names one of these arithmetics so that the simulator
and the tests compute what ORT computes on the machine a model will be deployed to. A new family goes
here: its name, how to detect it, and its integer product (the simulator's layers call it). A policy can
avoid the saturation (policy.KernelOptions: uint8 weights, or ORT's x64 quant-precision session option);
its products are then exact whatever the family, and the simulator computes them so.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import numpy as np
import torch

from .arithmetic import activation_code_max
from .errors import PtqauditError

EXACT = "exact"
AVX2_U8S8 = "avx2-u8s8"
KERNEL_FAMILIES = {
    EXACT: "int32 accumulation of every product (VNNI, AVX512-VNNI, AMX, ARM dot product)",
    AVX2_U8S8: "u8 x s8 products added in pairs along K with int16 saturation (x86-64 AVX2 without VNNI)",
}
AUTO, ALL = "auto", "all"  # --kernels words: this machine's family, every family
INT16_MIN, INT16_MAX = -32768, 32767
PAIR_CHUNK_ELEMENTS = 2**24  # pair sums the saturating product holds at once: bounds its memory
EXACT_FLOAT32_LIMIT = 2**24  # integers up to this magnitude, and sums of them, are exact in float32
# the IR version of the probe graphs built here (ONNX 1.10's): helper.make_model stamps the onnx library's newest,
# which an older onnxruntime refuses (onnx 1.23 writes 14; onnxruntime 1.30 reads up to 13)
PROBE_IR_VERSION = 8

# CPU flags (Linux /proc/cpuinfo names) that select ORT's exact u8 x s8 kernels on x86-64
_VNNI_FLAGS = ("avx_vnni", "avx512_vnni", "amx_int8")


@functools.cache
def detect_kernel_family() -> str:
    """The family of this machine's ORT CPU kernels, measured: 255 x 127 over K = 2 is 64,770 exactly
    and 32,767 where pairs saturate. The probe decides; CPU flags only name the hardware."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "kernel_family_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
        [helper.make_tensor("b", TensorProto.INT8, [2, 1], [127, 127])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=PROBE_IR_VERSION)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"a": np.full((1, 2), 255, dtype=np.uint8)})
    return EXACT if int(result[0, 0]) == 2 * 255 * 127 else AVX2_U8S8


def parse_kernels(spec: str) -> tuple[str, ...]:
    """A fleet from --kernels: family names separated by commas, `auto` for this machine's, `all` for every
    family; in the order given, each once."""
    names = []
    for word in (w.strip() for w in spec.split(",")):
        if word == AUTO:
            names.append(detect_kernel_family())
        elif word == ALL:
            names += list(KERNEL_FAMILIES)
        elif word in KERNEL_FAMILIES:
            names.append(word)
        else:
            raise PtqauditError(f"--kernels: unknown kernel family {word[:40]!r}; expected {AUTO}, {ALL} or a comma "
                                f"list of {', '.join(KERNEL_FAMILIES)}")
    return tuple(dict.fromkeys(names))


def kernel_source(family: str) -> str:
    """Where the numbers of a family come from on this machine: ORT's own kernels, or the simulator's
    emulation of that family's arithmetic (tested against a NumPy oracle of it)."""
    return "ORT" if family == detect_kernel_family() else "emulated"


def kernel_label(family: str) -> str:
    """A family as results name it: `avx2-u8s8 (ORT)`, `exact (emulated)`."""
    return f"{family} ({kernel_source(family)})"


def cpu_description() -> str:
    """The CPU's model and the instruction-set extensions that decide ORT's integer kernels."""
    machine = platform.machine()
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the probe still decides the family
        pass
    extensions = [f for f in ("avx2", "avx512f", *_VNNI_FLAGS, "asimddp", "i8mm") if f in flags]
    return ", ".join(part for part in (model or machine, " ".join(extensions)) if part)


def largest_pair_sum(codes: torch.Tensor, activation_bits: int) -> float:
    """An upper bound of |a[2p] * w[2p, n] + a[2p+1] * w[2p+1, n]| over b-bit activation codes a and MatMul
    weight codes [K, N]: below 2^15 the avx2-u8s8 family's int16 pair sums cannot saturate on this layer."""
    magnitude = codes.detach().abs()
    if magnitude.shape[0] % 2:
        magnitude = torch.cat([magnitude, magnitude.new_zeros(1, magnitude.shape[1])])
    return float((magnitude[0::2] + magnitude[1::2]).max()) * activation_code_max(activation_bits)


def risky_pairs(weight: torch.Tensor, largest_code: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair index p, column n) of the weight pairs (rows 2p, 2p + 1 of [K, N] weight codes, K padded to even) whose
    sum can leave int16 with activation codes up to `largest_code`: |w[2p, n]| + |w[2p + 1, n]| > 32767 / code.
    They depend on the weight alone, so a layer computes them once per setting (with the largest code its
    width allows) and saturating_matmul corrects only them."""
    if weight.shape[0] % 2:
        weight = torch.nn.functional.pad(weight, (0, 0, 0, 1))
    magnitude = weight.detach().reshape(-1, 2, weight.shape[1]).abs().sum(dim=1)
    return torch.nonzero(magnitude * largest_code > INT16_MAX, as_tuple=True)


def saturating_matmul(codes: torch.Tensor, weight: torch.Tensor,
                      pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """sum over p of clip(a[2p] * w[2p] + a[2p+1] * w[2p+1], int16): what MLAS's AVX2 u8 x s8 kernel
    (vpmaddubsw) accumulates for uint8 codes [..., K] and int8 weight codes [K, N], K padded with zero
    to even. Returned in float64, which holds the int32 sum exactly. Differentiable: saturated pairs
    pass no gradient, as a clip does.

    Computed as the exact product (one GEMM) plus clip(s) - s for the pairs s that can leave int16 at all
    (risky_pairs: given, or found for these codes' largest value), a small share of them."""
    rows = codes.reshape(-1, codes.shape[-1])
    if rows.shape[1] % 2:
        rows = torch.nn.functional.pad(rows, (0, 1))
        weight = torch.nn.functional.pad(weight, (0, 0, 0, 1))
    largest_code = float(rows.detach().max()) if rows.numel() else 0.0
    exact_in_float32 = largest_code * float(weight.detach().abs().sum(dim=0).max()) < EXACT_FLOAT32_LIMIT
    dtype = torch.float32 if exact_in_float32 else torch.float64
    total = rows.to(dtype) @ weight.to(dtype)
    weight_pairs = weight.reshape(-1, 2, weight.shape[1])  # [P, 2, N]
    pair, column = pairs if pairs is not None else risky_pairs(weight, largest_code)
    chunk = max(1, PAIR_CHUNK_ELEMENTS // max(1, rows.shape[0]))
    for start in range(0, len(pair), chunk):
        p, n = pair[start:start + chunk], column[start:start + chunk]
        # each pair sum is at most 2 * 255 * 127 in magnitude: exact in float32
        sums = rows[:, 2 * p] * weight_pairs[p, 0, n] + rows[:, 2 * p + 1] * weight_pairs[p, 1, n]  # [M, pairs]
        total = total.index_add(1, n, (sums.clamp(INT16_MIN, INT16_MAX) - sums).to(dtype))
    return total.double().reshape(*codes.shape[:-1], weight.shape[1])


def accumulator_bound(codes: torch.Tensor, activation_bits: int, output_axis: int) -> float:
    """Largest |int32 accumulator| any input can produce: sum of |weight codes| feeding one output
    times the largest |activation code - zero point| (2^b - 1)."""
    other = tuple(a for a in range(codes.dim()) if a != output_axis)
    return float(codes.detach().abs().sum(dim=other).max()) * activation_code_max(activation_bits)


def product_plan(codes: torch.Tensor, activation_bits: int, output_axis: int, family: str,
                 matrix_kernel: bool = True) -> tuple[bool, tuple[torch.Tensor, torch.Tensor] | None]:
    """How a layer's weight codes meet b-bit activation codes on `family`: whether float32 sums of the product
    stay exact, and the weight pairs the family's kernel can saturate on (risky_pairs; None where it cannot,
    e.g. ConvInteger, matrix_kernel False). A matrix kernel's codes are [K, N]."""
    exact_in_float32 = accumulator_bound(codes, activation_bits, output_axis) < EXACT_FLOAT32_LIMIT
    saturates = family == AVX2_U8S8 and matrix_kernel and largest_pair_sum(codes, activation_bits) > INT16_MAX
    return exact_in_float32, risky_pairs(codes, activation_code_max(activation_bits)) if saturates else None


def saturating_product(codes: torch.Tensor, zero_point: torch.Tensor, weight: torch.Tensor,
                       pairs: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(codes - zero point) x weight codes [K, N] as MLAS's AVX2 u8 x s8 kernel adds them up: the raw uint8
    codes in int16-saturated pairs (saturating_matmul), then the zero point's correction; float32, as ORT's
    Cast of the int32 accumulator."""
    raw = codes + zero_point
    return (saturating_matmul(raw, weight, pairs) - zero_point.double() * weight.double().sum(dim=0)).float()
