"""Torch quantizers with ONNX Runtime's dynamic-quantization arithmetic and straight-through gradients.

Bit-widths are call arguments, not constructor arguments: one model serves every policy.
"""

from __future__ import annotations

import torch

from ..kernels import INT16_MAX, INT16_MIN
from ..quantize import weight_code_limit

EXACT_FLOAT32_LIMIT = 2**24  # integers up to this magnitude, and sums of them, are exact in float32
PAIR_CHUNK_ELEMENTS = 2**24  # pair sums held at once by the saturating product: bounds its memory


class RoundHalfEvenSTE(torch.autograd.Function):
    """torch.round (half to even, as ORT) forward; identity gradient (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def activation_scale_zero_point(x: torch.Tensor, bits: int, per_sample: bool,
                                nonnegative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DynamicQuantizeLinear's parameters at b bits, over the whole tensor (ORT at this batch) or per
    sample (each input alone, as a batch-size-1 deployment sees it). Shapes broadcast against x.
    nonnegative: x is known to be >= 0 (a ReLU output), so rmin = 0 without reading x for its minimum."""
    with torch.no_grad():
        # each sample's values as one row, without a copy in either memory layout; row-wise amin and amax
        # are several times faster on CPU than aminmax or a whole-tensor min/max
        rows = x.permute(0, 2, 3, 1) if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else x
        rows = rows.reshape(x.shape[0], -1)
        high = rows.amax(dim=1)
        low = torch.zeros_like(high) if nonnegative else rows.amin(dim=1)
        if per_sample:
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        else:
            shape = (1,) * x.dim()
            low, high = low.min(), high.max()
        low, high = low.reshape(shape), high.reshape(shape)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        rmin, rmax = torch.minimum(low, zero), torch.maximum(high, zero)
        qmax = float(2**bits - 1)
        span = rmax - rmin
        scale = torch.where(span == 0, torch.ones_like(span), span / qmax)
        zero_point = torch.round(torch.clamp(-rmin / scale, 0.0, qmax))
    return scale, zero_point


def centered_activation_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                              nonnegative: bool = False) -> torch.Tensor:
    """codes - zero point, as floats holding exact integers: what ConvInteger / MatMulInteger multiply.
    The gradient passes straight through the rounding and stops outside the code range."""
    # clip(round(x / scale) + zp, 0, qmax) - zp, with the shift folded into the clip bounds (exact: all integers)
    low, high = -zero_point, float(2**bits - 1) - zero_point
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.clamp(RoundHalfEvenSTE.apply(x / scale), low, high)
    # no gradient needed: the same arithmetic in place, with plain-number bounds where the range is shared
    codes = torch.div(x, scale).round_()
    if nonnegative:
        # 0 <= x <= rmax, zero point 0 and scale = rmax / qmax (to float32 rounding): x / scale already lies
        # in [0, qmax + 2^-15], so it rounds into [0, qmax] and the clip would change nothing
        return codes
    if zero_point.numel() == 1:
        return codes.clamp_(low.item(), high.item())
    return torch.minimum(torch.maximum(codes, low, out=codes), high, out=codes)


def weight_codes(weight: torch.Tensor, bits: int, channel_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric b-bit codes (floats holding integers, straight-through gradient) and float32 scales
    shaped to broadcast against the weight; the scale is computed in float64 and stored as float32,
    as onnxruntime.quantization does (ptqaudit.quantize.quantize_weight is the NumPy twin)."""
    limit = weight_code_limit(bits)
    with torch.no_grad():
        magnitude = weight.abs()
        if channel_axis is None:
            absmax = magnitude.max().reshape((1,) * weight.dim())
        else:
            other = tuple(a for a in range(weight.dim()) if a != channel_axis)
            absmax = magnitude.amax(dim=other, keepdim=True)
        scale = (2.0 * absmax.double() / (2 * limit)).float()
        scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)
    codes = torch.clamp(RoundHalfEvenSTE.apply(weight / scale), -limit, limit)
    return codes, scale


def accumulator_bound(codes: torch.Tensor, activation_bits: int, output_axis: int) -> float:
    """Largest |int32 accumulator| any input can produce: sum of |weight codes| feeding one output
    times the largest |activation code - zero point| (2^b - 1)."""
    other = tuple(a for a in range(codes.dim()) if a != output_axis)
    return float(codes.detach().abs().sum(dim=other).max()) * (2**activation_bits - 1)


def largest_pair_sum(codes: torch.Tensor, activation_bits: int) -> float:
    """An upper bound of |a[2p] * w[2p, n] + a[2p+1] * w[2p+1, n]| over b-bit activation codes a and MatMul
    weight codes [K, N]: below 2^15 the avx2-u8s8 family's int16 pair sums cannot saturate on this layer."""
    magnitude = codes.detach().abs()
    if magnitude.shape[0] % 2:
        magnitude = torch.cat([magnitude, magnitude.new_zeros(1, magnitude.shape[1])])
    return float((magnitude[0::2] + magnitude[1::2]).max()) * (2**activation_bits - 1)


def saturating_matmul(codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum over p of clip(a[2p] * w[2p] + a[2p+1] * w[2p+1], int16): what MLAS's AVX2 u8 x s8 kernel
    (vpmaddubsw) accumulates for uint8 codes [..., K] and int8 weight codes [K, N], K padded with zero
    to even. Returned in float64, which holds the int32 sum exactly. Differentiable: saturated pairs
    pass no gradient, as a clip does."""
    rows = codes.reshape(-1, codes.shape[-1])
    k = rows.shape[1]
    if k % 2:
        rows = torch.nn.functional.pad(rows, (0, 1))
        weight = torch.nn.functional.pad(weight, (0, 0, 0, 1))
    pairs = rows.reshape(rows.shape[0], -1, 2).transpose(0, 1)  # [P, M, 2]
    weight_pairs = weight.reshape(-1, 2, weight.shape[1])  # [P, 2, N]
    chunk = max(1, PAIR_CHUNK_ELEMENTS // max(1, rows.shape[0] * weight.shape[1]))
    total = None
    for start in range(0, pairs.shape[0], chunk):
        # each pair sum is at most 2 * 255 * 127 in magnitude: exact in float32 before the clip
        pair_sums = torch.bmm(pairs[start:start + chunk], weight_pairs[start:start + chunk])
        part = pair_sums.clamp(INT16_MIN, INT16_MAX).double().sum(dim=0)
        total = part if total is None else total + part
    return total.reshape(*codes.shape[:-1], weight.shape[1])
