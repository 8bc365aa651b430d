"""The quantization arithmetic both engines share: weight codes and scales, activation ranges and codes.

Each formula is written once, in torch. The simulator calls these functions on its tensors; the ONNX
rewrite calls quantize_weight for its constant weights and writes the activation formula as ONNX nodes
with the constants defined here, so the two engines agree by construction. Both follow
onnxruntime.quantization: symmetric int8-held weight codes, asymmetric uint8 activation codes
(DynamicQuantizeLinear), round half to even. Straight-through gradients make the formulas trainable;
with range_gradient the scales pass a gradient to the ranges they are measured from as well.
"""

from __future__ import annotations

import numpy as np
import torch


def weight_code_limit(bits: int) -> int:
    """Largest |code| of a b-bit symmetric weight. 7 bits is ONNX Runtime's reduce_range grid,
    whose codes run from -64 to 64 (scale max|w| / 64), so a w7 policy means the same on every path."""
    return 64 if bits == 7 else 2 ** (bits - 1) - 1


def activation_code_max(bits: int) -> int:
    """Largest b-bit activation code: codes run from 0 to 2^b - 1 (DynamicQuantizeLinear's uint8 at 8)."""
    return 2**bits - 1


def _with_range_gradient(scale: torch.Tensor, live_scale: torch.Tensor) -> torch.Tensor:
    """`scale` exactly as computed (the forward pass stays ORT's to the bit), with the gradient of `live_scale`,
    the same scale as a function of the range: a loss under quantization can then move the extreme values that
    set the step (as LSQ learns its step, here through the min-max range dynamic quantization measures)."""
    return scale + (live_scale - live_scale.detach())


class RoundHalfEvenSTE(torch.autograd.Function):
    """torch.round (half to even, as ORT) forward; identity gradient (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def weight_codes(weight: torch.Tensor, bits: int, channel_axis: int | None,
                 range_gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric b-bit codes (floats holding integers, straight-through gradient) and float32 scales
    shaped to broadcast against the weight, per tensor (channel_axis None) or per slice along
    channel_axis; the scale is computed in float64 and stored as float32, as onnxruntime.quantization
    does, and the codes are round-half-even(float32 w / float32 scale). range_gradient: the scale also
    passes a gradient to the largest |w| it is measured from."""
    limit = weight_code_limit(bits)
    with torch.set_grad_enabled(range_gradient and torch.is_grad_enabled()):
        magnitude = weight.abs()
        if channel_axis is None:
            absmax = magnitude.max().reshape((1,) * weight.dim())
        else:
            other = tuple(a for a in range(weight.dim()) if a != channel_axis)
            absmax = magnitude.amax(dim=other, keepdim=True)
    with torch.no_grad():
        scale = (2.0 * absmax.double() / (2 * limit)).float()
        # an all-zero weight (or channel) has no range: ORT then uses scale 1, which keeps every code 0
        scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)
    if absmax.requires_grad:
        scale = _with_range_gradient(scale, absmax / limit)
    codes = torch.clamp(RoundHalfEvenSTE.apply(weight / scale), -limit, limit)
    return codes, scale


def quantize_weight(weight: np.ndarray, bits: int, channel_axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """weight_codes for a NumPy weight, as the ONNX rewrite stores it: int8 codes and float32 scales,
    a scalar per tensor or a vector per channel."""
    with torch.no_grad():
        codes, scale = weight_codes(torch.from_numpy(np.array(weight, dtype=np.float32)), bits, channel_axis)
    scale = scale.numpy()
    return codes.numpy().astype(np.int8), scale.reshape(-1) if channel_axis is not None else scale.reshape(())


def table_codes(table: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An embedding table as onnxruntime.quantization stores it for a quantized Gather: asymmetric unsigned
    b-bit codes like an activation's, but with the parameters computed in NumPy as its compute_scale_zp does
    (range widened to include 0, scale = range / (2^b - 1) in float64 stored as float32, zero point =
    round(-rmin / float64 scale), codes = clip(round(w / float32 scale) + zero point, 0, 2^b - 1)).
    Returns (codes - zero point as floats, straight-through gradient; float32 scale; zero point)."""
    qmax = activation_code_max(bits)
    with torch.no_grad():
        low = min(float(table.min()), 0.0) if table.numel() else 0.0
        high = max(float(table.max()), 0.0) if table.numel() else 0.0
        low32, high32 = np.float32(low), np.float32(high)
        scale64 = (np.float64(high32) - np.float64(low32)) / np.float64(qmax)
        if scale64 < np.finfo(np.float32).tiny:
            scale32, zero_point = np.float32(1.0), 0
        else:
            scale32, zero_point = np.float32(scale64), int(np.round(0 - np.float64(low32) / scale64))
    scale = torch.tensor(scale32, dtype=torch.float32, device=table.device)
    codes = torch.clamp(RoundHalfEvenSTE.apply(table / scale) + zero_point, 0, qmax) - zero_point
    return codes, scale, zero_point


def quantize_table(table: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """table_codes for a NumPy table, as the ONNX rewrite stores it: uint8 codes, float32 scale, uint8 zero point."""
    with torch.no_grad():
        codes, scale, zero_point = table_codes(torch.from_numpy(np.array(table, dtype=np.float32)), bits)
    return ((codes + zero_point).numpy().astype(np.uint8), scale.numpy().reshape(()),
            np.array(zero_point, dtype=np.uint8))


def activation_scale_zero_point(x: torch.Tensor, bits: int, per_sample: bool, nonnegative: bool = False,
                                range_gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DynamicQuantizeLinear's parameters at b bits, over the whole tensor (ORT at this batch) or per
    sample (each input alone, as a batch-size-1 deployment sees it): range widened to include 0,
    scale = range / (2^b - 1) (1 when the range is empty), zero point = round(clip(-rmin / scale)).
    Shapes broadcast against x. nonnegative: x is known to be >= 0 (a ReLU output), so rmin = 0
    without reading x for its minimum. range_gradient: the scale also passes a gradient to the extreme
    values of x it is measured from (the zero point stays a constant)."""
    with torch.set_grad_enabled(range_gradient and torch.is_grad_enabled()):
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
    qmax = float(activation_code_max(bits))
    with torch.no_grad():
        span = rmax - rmin
        scale = torch.where(span == 0, torch.ones_like(span), span / qmax)
        zero_point = torch.round(torch.clamp(-rmin / scale, 0.0, qmax))
    if rmax.requires_grad:
        scale = _with_range_gradient(scale, (rmax - rmin) / qmax)
    return scale, zero_point


def centered_activation_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                              nonnegative: bool = False) -> torch.Tensor:
    """codes - zero point, as floats holding exact integers: what ConvInteger / MatMulInteger multiply.
    The gradient passes straight through the rounding and stops outside the code range."""
    # clip(round(x / scale) + zp, 0, qmax) - zp, with the shift folded into the clip bounds (exact: all integers)
    low, high = -zero_point, float(activation_code_max(bits)) - zero_point
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
