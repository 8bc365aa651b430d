"""Pure-NumPy reference of ONNX Runtime's dynamic quantization arithmetic for one layer (test oracle, no ORT/torch).

What ONNX Runtime 1.32 ``quantize_dynamic(weight_type=QInt8)`` produces, and what this module reproduces
bit for bit at 8 bits (established by reading ``onnxruntime/quantization`` and by running ORT, see
``tests/test_numpy_reference.py``):

Activations (input 0 of each quantized Conv / MatMul): ``DynamicQuantizeLinear`` (uint8), all float32:
    rmin = min(0, min(x)), rmax = max(0, max(x)) over the whole tensor (batch included)
    scale = (rmax - rmin) / 255            (float32 division; scale = 1.0 exactly when rmax == rmin,
                                            i.e. an all-zero tensor -> codes 0, zp 0, scale 1.0)
    zp = rint(clip(0 - rmin / scale, 0, 255))      (rint = round half to even)
    q = clip(rint(x / scale) + zp, 0, 255)         (a true float32 division, not x * (1/scale))
    all-negative x -> zp = 255; all-positive x -> zp = 0.
    For b < 8 bits the same formula with 255 -> 2^b - 1 (ORT's op is 8-bit only).
    Not modelled: ranges so small that scale underflows to 0 (|x| < ~3.6e-43) or overflows to inf.

Weights (initializers): symmetric int8, zero point 0, computed by ``quant_utils.compute_scale_zp`` in
float64 and then stored as float32:
    scale = float32(float64(2 * max|w|) / float64(2 * qmax))   (float64 then rounded once to float32; this
                                                              equals the float32 division max|w| / qmax)
    if the float64 scale < float32 tiny (max|w| == 0 included): scale = 1.0 (codes all 0)
    q = clip(rint(float32(w) / float32(scale)), -qmax, qmax)   (float32 division)
    qmax = 127 at 8 bits; ``reduce_range=True`` uses the INT8 range (-64, 64): qmax = 64, scale = max|w|/64,
    codes in [-64, 64] (129 levels, not a true 7-bit two's-complement range). This module calls that case
    bits=7 (see ``weight_qmax``).
    Per channel: MatMul weight (K, N) per column N (ORT axis -1); Gemm is rewritten to MatMul first, so also
    per output feature. Conv: ``quantize_dynamic`` IGNORES per_channel (always per tensor); ORT's CPU
    ConvInteger also rejects a non-scalar weight zero point. ``conv_layer(per_channel=True)`` here means
    per output channel (W axis 0), zero point scalar 0, scale applied after the integer conv: the graph a
    production rewrite must build itself.

Product and rescale (ORT graph order):
    acc = ConvInteger / MatMulInteger (int32 accumulation of (xq - x_zp) * (wq - 0))
    scales = Mul(x_scale, w_scale)               (float32; per-channel -> shape [C])
    y = Mul(Cast<float32>(acc), scales)           then  y = Add(y, bias)
    Conv bias is Reshape(B, [1, -1, 1, 1]); MatMul bias is the separate Add node kept as is.
    With default session optimisations ORT fuses the MatMul chain (+ Add) into com.microsoft
    DynamicQuantizeMatMul; on the tested x86 CPU its output is still bitwise equal to this order.

Gemm: ``quantize_dynamic`` rewrites Gemm -> MatMul (+ Add C) only when alpha == beta == 1 and transA == 0;
with transB=1 the weight becomes a new initializer ``<B>_Transposed`` = B.T (K, N). The MatMul is named
``<gemm>_MatMul`` and is quantized only if 'MatMul' is in op_types_to_quantize (and, with nodes_to_quantize,
only if '<gemm>_MatMul' is listed: the Gemm's own name no longer matches, in nodes_to_exclude too).
Gemm with alpha != 1 or beta != 1 is left in float32, unquantized. ``gemm_layer`` defines those cases as
the float rewrite MatMul(x, float32(alpha) * B') + float32(beta) * C, then ORT's MatMul quantization
(exact for alpha == beta == 1).
"""

from __future__ import annotations

import numpy as np

_F32 = np.float32


def _rint(v: np.ndarray) -> np.ndarray:
    """Round half to even, keeping the dtype (ORT uses nearbyint / numpy.round, both half-even)."""
    return np.rint(v)


def quantize_activation(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.float32, np.uint8]:
    """DynamicQuantizeLinear generalised to b bits: returns (codes uint8, scale float32, zero_point uint8).

    rmin = min(0, min(x)), rmax = max(0, max(x)) over the whole tensor; scale = (rmax - rmin) / (2^b - 1)
    in float32; scale = 1.0 when rmax == rmin (ORT's all-zero behaviour: codes 0, zp 0);
    zp = rint(clip(0 - rmin / scale, 0, 2^b - 1)); q = clip(rint(x / scale) + zp, 0, 2^b - 1).
    All float math in float32 with true division, like ORT's CPU kernel. Bit-exact against ORT at b = 8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"activation bits must be in 1..8, got {bits}")
    x = np.asarray(x, dtype=_F32)
    qmax = _F32(2**bits - 1)
    rmin = np.minimum(_F32(0), x.min()) if x.size else _F32(0)
    rmax = np.maximum(_F32(0), x.max()) if x.size else _F32(0)
    if rmax == rmin:
        scale = _F32(1.0)
    else:
        scale = _F32((rmax - rmin) / qmax)
    zp_f = _rint(np.clip(_F32(0) - rmin / scale, _F32(0), qmax))
    zp = np.uint8(zp_f)
    q = np.clip(_rint(x / scale) + zp_f, _F32(0), qmax).astype(np.uint8)
    return q, _F32(scale), zp


def weight_qmax(bits: int) -> int:
    """Largest weight code magnitude for b-bit symmetric weights: 2^(b-1) - 1 for b in 2..8, except b = 7.

    b = 7 is ORT's ``reduce_range=True`` for INT8 weights: ``get_qmin_qmax_for_qType(INT8, reduce_range=True)``
    returns (-64, 64) (ONNX_INT_TYPE_REDUCED_RANGE), so codes lie in [-64, 64] and scale = 2*max|w| / 128
    = max|w| / 64 (not 63). Without reduce_range the symmetric INT8 range is (-127, 127): qmax 127.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be in 2..8, got {bits}")
    if bits == 7:
        return 64
    return 2 ** (bits - 1) - 1


def _weight_scale(absmax: np.float32, qmax: int) -> np.float32:
    """ORT's compute_scale_zp(symmetric=True): float64 (rmax - rmin) / (qmax - qmin), stored as float32."""
    dr = np.float64(absmax) - np.float64(-absmax)
    dq = np.float64(qmax) - np.float64(-qmax)
    scale64 = dr / dq
    if scale64 < np.finfo(_F32).tiny:  # max|w| == 0 (or denormal): ORT falls back to scale 1, zp 0
        return _F32(1.0)
    return _F32(scale64)


def quantize_weight(w: np.ndarray, bits: int, per_channel: bool, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight quantization exactly as ORT's quant_utils.quantize_data (symmetric INT8).

    Returns (codes int8 with w's shape, scales float32: shape () per tensor, (w.shape[axis],) per channel).
    scale = float32(float64(max|w|) / qmax) (computed in float64, see _weight_scale), 1.0 if that is below
    float32 tiny; q = clip(rint(float32(w) / scale), -qmax, qmax) with a float32 division.
    """
    w = np.asarray(w, dtype=_F32)
    qmax = weight_qmax(bits)
    if per_channel:
        axis = axis % w.ndim
        moved = np.moveaxis(w, axis, 0)
        absmax = [np.max(np.abs(ch)) if ch.size else _F32(0) for ch in moved]
        scales = np.array([_weight_scale(a, qmax) for a in absmax], dtype=_F32)
        bshape = [1] * w.ndim
        bshape[axis] = -1
        div = scales.reshape(bshape)
    else:
        scales = np.array(_weight_scale(np.max(np.abs(w)) if w.size else _F32(0), qmax), dtype=_F32)
        div = scales
    codes = np.clip(_rint(w / div), -qmax, qmax).astype(np.int8)
    return codes, scales


def _fit_int32(acc: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.int32)
    assert acc.size == 0 or (acc.min() >= info.min and acc.max() <= info.max), "accumulator overflows int32"
    return acc.astype(np.int32)


def conv_integer(xq, x_zp, wq, w_zp, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1) -> np.ndarray:
    """ConvInteger: sum of (xq - x_zp) * (wq - w_zp), NCHW 2-D, exact integers, returned as int32.

    pads = [top, left, bottom, right] (ONNX order); padded input positions equal x_zp (contribute 0).
    w_zp may be a scalar or one value per output channel. Supports groups (depthwise included).
    """
    x = np.asarray(xq).astype(np.int64) - np.int64(np.asarray(x_zp).astype(np.int64))
    wz = np.asarray(w_zp).astype(np.int64)
    w = np.asarray(wq).astype(np.int64)
    w = w - (wz.reshape(-1, 1, 1, 1) if wz.ndim == 1 else wz)
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads
    if c != cg * group or m % group:
        raise ValueError(f"channels {c} / weight {w.shape} do not fit group={group}")
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    mg = m // group
    acc = np.zeros((n, m, oh, ow), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
            for g in range(group):
                acc[:, g * mg : (g + 1) * mg] += np.einsum(
                    "nchw,mc->nmhw", patch[:, g * cg : (g + 1) * cg], w[g * mg : (g + 1) * mg, :, i, j]
                )
    return _fit_int32(acc)


KERNEL_FAMILIES = ("exact", "avx2-u8s8")


def matmul_integer(aq, a_zp, bq, b_zp, family: str = "exact") -> np.ndarray:
    """MatMulInteger: (aq - a_zp) @ (bq - b_zp), int32. b_zp scalar or per column.

    family "exact": every product summed in int32 (VNNI, AMX, ARM dot product). "avx2-u8s8": ORT's AVX2
    u8 x s8 kernel (vpmaddubsw) with b_zp = 0: the raw codes' products of consecutive pairs along K
    (K padded with zero to even) are each clipped to int16 before the int32 sum, and the zero point is
    corrected exactly afterwards: sum_p clip(a[2p]b[2p] + a[2p+1]b[2p+1]) - a_zp * sum_k b[k].
    """
    a_raw = np.asarray(aq).astype(np.int64)
    b = np.asarray(bq).astype(np.int64) - np.asarray(b_zp).astype(np.int64)
    zp = np.asarray(a_zp).astype(np.int64)
    if family == "exact":
        return _fit_int32(np.matmul(a_raw - zp, b))
    if family != "avx2-u8s8":
        raise ValueError(f"unknown kernel family {family!r}")
    assert not np.any(b_zp), "the avx2-u8s8 model here is for symmetric weights (zero point 0)"
    k = a_raw.shape[-1]
    acc = np.zeros(a_raw.shape[:-1] + b.shape[1:], dtype=np.int64)
    for p in range(0, k, 2):
        pair = a_raw[..., p, None] * b[p]
        if p + 1 < k:
            pair = pair + a_raw[..., p + 1, None] * b[p + 1]
        acc += np.clip(pair, -32768, 32767)
    return _fit_int32(acc - zp * b.sum(axis=0))


def dequantize_output(acc_int32, x_scale, w_scale, bias, channel_axis) -> np.ndarray:
    """ORT's order: scales = x_scale * w_scale (float32 Mul); y = float32(acc) * scales; y = y + bias.

    A per-channel w_scale is laid along channel_axis of acc (1 for conv NCHW, -1 for matmul). A 1-D bias
    is laid along channel_axis too (Conv's Reshape(B, [1,-1,1,1])); other biases broadcast numpy-style.
    """
    acc = np.asarray(acc_int32)
    scales = _F32(x_scale) * np.asarray(w_scale, dtype=_F32)
    axis = channel_axis % acc.ndim
    shape = [1] * acc.ndim
    shape[axis] = -1
    if scales.ndim == 1:
        scales = scales.reshape(shape)
    y = acc.astype(_F32) * scales
    if bias is not None:
        b = np.asarray(bias, dtype=_F32)
        if b.ndim == 1 and axis != acc.ndim - 1:
            b = b.reshape(shape)
        y = y + b
    return y.astype(_F32, copy=False)


def conv_layer(
    x, w, b, bits_w, bits_a, per_channel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1
) -> dict:
    """One dynamically quantized Conv (NCHW, weight (M, C/group, kh, kw)).

    per_channel=False is exactly ORT's quantize_dynamic graph. per_channel=True (which quantize_dynamic
    ignores for Conv) is per output channel: scales [M], weight zero point scalar 0, rescale along axis 1.
    """
    x_codes, x_scale, x_zp = quantize_activation(x, bits_a)
    w_codes, w_scale = quantize_weight(w, bits_w, per_channel, axis=0)
    acc = conv_integer(x_codes, x_zp, w_codes, np.int8(0), strides, pads, dilations, group)
    y = dequantize_output(acc, x_scale, w_scale, b, channel_axis=1)
    return {"x_codes": x_codes, "x_scale": x_scale, "x_zp": x_zp, "w_codes": w_codes, "w_scale": w_scale,
            "acc": acc, "y": y}


def matmul_layer(x, w, b, bits_w, bits_a, per_channel, family: str = "exact") -> dict:
    """One dynamically quantized MatMul x @ w (w (K, N) initializer) followed by Add(b) if b is not None.

    Per channel = per column N (ORT's axis -1). x may have any leading dims; its range spans all of them.
    family: the integer kernel's arithmetic (see matmul_integer).
    """
    w = np.asarray(w, dtype=_F32)
    if w.ndim != 2:
        raise ValueError(f"matmul weight must be 2-D (K, N), got shape {w.shape}")
    x_codes, x_scale, x_zp = quantize_activation(x, bits_a)
    w_codes, w_scale = quantize_weight(w, bits_w, per_channel, axis=1)
    acc = matmul_integer(x_codes, x_zp, w_codes, np.int8(0), family)
    y = dequantize_output(acc, x_scale, w_scale, b, channel_axis=-1)
    return {"x_codes": x_codes, "x_scale": x_scale, "x_zp": x_zp, "w_codes": w_codes, "w_scale": w_scale,
            "acc": acc, "y": y}


def gemm_layer(x, w, b, bits_w, bits_a, per_channel, trans_b: bool, alpha=1.0, beta=1.0,
               family: str = "exact") -> dict:
    """One dynamically quantized Gemm (transA = 0): ORT's rewrite to MatMul(x, B') + Add(C), B' = B.T if trans_b.

    Returned w_codes / w_scale are those of B' (K, N), the initializer ORT creates (``<B>_Transposed``).
    alpha != 1 / beta != 1 (left unquantized by quantize_dynamic) are folded in float32 first:
    B' <- float32(alpha) * B', C <- float32(beta) * C.
    """
    w = np.asarray(w, dtype=_F32)
    wk = np.ascontiguousarray(w.T if trans_b else w)
    if alpha != 1.0:
        wk = (_F32(alpha) * wk).astype(_F32)
    c = None
    if b is not None:
        c = np.asarray(b, dtype=_F32)
        if beta != 1.0:
            c = (_F32(beta) * c).astype(_F32)
    return matmul_layer(x, wk, c, bits_w, bits_a, per_channel, family)
