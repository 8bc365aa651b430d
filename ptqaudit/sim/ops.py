"""PyTorch versions of the ONNX operators the simulator runs outside quantized layers, one per op."""

from __future__ import annotations

import math
import platform

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

ONNX_TO_TORCH_DTYPE = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32, TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8, TensorProto.BOOL: torch.bool, TensorProto.INT16: torch.int16,
    TensorProto.UINT16: torch.uint16, TensorProto.UINT32: torch.uint32, TensorProto.UINT64: torch.uint64,
    TensorProto.BFLOAT16: torch.bfloat16,
}


def attributes(node) -> dict:
    """A node's attributes by name. A Split without a num_outputs attribute also gets num_outputs = its
    output count, which its handler cannot see otherwise: at opset 13-17 a Split with no `split` input
    makes that many equal parts."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Split" and "num_outputs" not in attrs:
        attrs["num_outputs"] = len(node.output)
    return attrs


def _text(attrs, key: str, default: str) -> str:
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _binary(fn):
    return lambda attrs, a, b: fn(a, b)


def _div(attrs, a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


def _constant(attrs):
    if "value" in attrs:
        return torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"])))
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(list(attrs[key]), dtype=dtype)
    raise NotImplementedError("Constant without a value/value_float(s)/value_int(s) attribute")


def _constant_of_shape(attrs, shape):
    value = torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"]))) if "value" in attrs else torch.zeros(1)
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


def conv_padding(attrs, spatial_rank: int, input_shape=None, kernel_shape=None) -> tuple[list[int], bool]:
    """ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end] -> (torch F.pad list, symmetric?)."""
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        if input_shape is None:
            raise NotImplementedError(f"auto_pad={auto_pad}")
        strides = attrs.get("strides", [1] * spatial_rank)
        dilations = attrs.get("dilations", [1] * spatial_rank)
        begins, ends = [], []
        for size, k, s, d in zip(input_shape[2:], kernel_shape, strides, dilations):
            out = math.ceil(size / s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(large if auto_pad == "SAME_LOWER" else small)
            ends.append(small if auto_pad == "SAME_LOWER" else large)
        pads = begins + ends
    else:
        pads = list(attrs.get("pads", [0] * 2 * spatial_rank)) if auto_pad == "NOTSET" else [0] * 2 * spatial_rank
    begins, ends = pads[:spatial_rank], pads[spatial_rank:]
    torch_pad = []
    for b, e in zip(reversed(begins), reversed(ends)):
        torch_pad += [b, e]
    return torch_pad, begins == ends


def conv_forward(x, weight, bias, attrs):
    """ONNX Conv (1-D to 3-D) on torch, padding asymmetric pads explicitly."""
    rank = weight.dim() - 2
    torch_pad, symmetric = conv_padding(attrs, rank, x.shape, weight.shape[2:])
    if symmetric:
        padding = torch_pad[::2][::-1]
    else:
        x, padding = F.pad(x, torch_pad), [0] * rank
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return conv(x, weight, bias, stride=attrs.get("strides", 1), padding=padding,
                dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1))


def _conv(attrs, x, w, b=None):
    return conv_forward(x, w, b, attrs)


def _pool(kind):
    def run(attrs, x):
        rank = x.dim() - 2
        kernel = attrs["kernel_shape"]
        torch_pad, symmetric = conv_padding(attrs, rank, x.shape, kernel)
        strides = attrs.get("strides", [1] * rank)
        ceil_mode = bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            if not symmetric:
                x, padding = F.pad(x, torch_pad, value=float("-inf")), 0
            else:
                padding = torch_pad[::2][::-1]
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
            return pool(x, kernel, strides, padding, dilation=attrs.get("dilations", 1), ceil_mode=ceil_mode)
        count_include_pad = bool(attrs.get("count_include_pad", 0))
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        if symmetric:
            return pool(x, kernel, strides, torch_pad[::2][::-1], ceil_mode=ceil_mode, count_include_pad=count_include_pad)
        # asymmetric pads: zero-pad explicitly; without count_include_pad, divide by the real-input share
        padded = pool(F.pad(x, torch_pad), kernel, strides, 0, ceil_mode=ceil_mode, count_include_pad=False)
        if count_include_pad:
            return padded
        mask = F.pad(torch.ones_like(x[:1, :1]), torch_pad)
        return padded / pool(mask, kernel, strides, 0, ceil_mode=ceil_mode, count_include_pad=False)

    return run


MLAS_LANES = 4  # MLAS's portable float vector width, which fixes the order its global pooling sums in
# how MLAS folds its four lane sums into one (MlasReduceAddFloat32x4): NEON adds neighbouring lanes first
LANE_FOLD = ((0, 1), (2, 3)) if platform.machine().lower() in ("arm64", "aarch64") else ((0, 2), (1, 3))


def _global_average_pool(attrs, x):
    """Mean over the spatial dims, summed in MLAS's order so the float32 result is ORT's bit for bit:
    four running sums (elements i, i+4, i+8, ...), folded in pairs as this CPU's MLAS folds them, then the
    remaining elements one at a time, then one division by the element count."""
    flat = x.reshape(*x.shape[:2], -1)
    count = flat.shape[-1]
    vector_end = count - count % MLAS_LANES
    lanes = flat.new_zeros(*flat.shape[:2], MLAS_LANES)
    for start in range(0, vector_end, MLAS_LANES):
        lanes = lanes + flat[..., start:start + MLAS_LANES]
    (a, b), (c, d) = LANE_FOLD
    total = (lanes[..., a] + lanes[..., b]) + (lanes[..., c] + lanes[..., d])
    for index in range(vector_end, count):
        total = total + flat[..., index]
    # a tensor divisor: torch may turn division by a Python scalar into multiplication by its reciprocal
    mean = total / torch.full_like(total, float(count))
    return mean.reshape(*x.shape[:2], *([1] * (x.dim() - 2)))


def _gemm(attrs, a, b, c=None):
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def _flatten(attrs, x):
    axis = attrs.get("axis", 1)
    axis += x.dim() if axis < 0 else 0  # axis == rank is allowed: [prod, 1]
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), int(np.prod(x.shape[axis:], dtype=np.int64)))


def _reshape(attrs, x, shape):
    target = _ints(shape)
    if not attrs.get("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _slice(attrs, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            start = max(0, min(size, start + size if start < 0 else start))
            end = max(0, min(size, end + size if end < 0 else end))
            index[axis] = slice(start, end, step)
        else:  # torch has no negative steps: slice the reversed axis
            start = max(0, min(size - 1, start + size if start < 0 else start))
            end = max(-1, min(size - 1, end + size if end < 0 else end))
            flips.append(axis)
            index[axis] = slice(size - 1 - start, size - 1 - end, -step)
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(index)]


def _pad(attrs, x, pads=None, constant_value=None, axes=None):
    pads = _ints(pads) if pads is not None else list(attrs.get("pads", []))
    rank = x.dim()
    axes = [a % rank for a in _ints(axes)] if axes is not None else list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[len(axes) + i]
    torch_pad = []
    for axis in reversed(range(rank)):
        torch_pad += [begins[axis], ends[axis]]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant":
        value = constant_value.item() if constant_value is not None and constant_value.numel() else 0.0
        return F.pad(x, torch_pad, value=value)
    if mode not in ("reflect", "edge"):
        raise NotImplementedError(f"Pad mode {mode}")
    # F.pad's reflect/replicate pad only the last 1-3 axes: gather each padded axis instead
    for axis in range(rank):
        begin, end = begins[axis], ends[axis]
        if begin == 0 and end == 0:
            continue
        size = x.shape[axis]
        index = torch.arange(-begin, size + end, device=x.device)
        if mode == "edge":
            index = index.clamp(0, size - 1)
        else:
            period = 2 * (size - 1)
            index = index.abs() % period
            index = torch.where(index >= size, period - index, index)
        x = torch.index_select(x, axis, index)
    return x


def _clip(attrs, x, low=None, high=None):
    low = low if low is not None and low.numel() else attrs.get("min")
    high = high if high is not None and high.numel() else attrs.get("max")
    return x if low is None and high is None else torch.clamp(x, min=low, max=high)


def _batch_norm(attrs, x, scale, bias, mean, var):
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale / torch.sqrt(var + attrs.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _reduce(fn):
    def run(attrs, x, axes=None):
        axes = _ints(axes) if axes is not None else attrs.get("axes")
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        if x.is_floating_point() or fn in (torch.amax, torch.amin):
            return fn(x, dim=tuple(axes), keepdim=keep)
        # integer tensors keep their type (torch.sum would widen, torch.mean refuses)
        return fn(x.double(), dim=tuple(axes), keepdim=keep).trunc().to(x.dtype)

    return run


def _unsqueeze(attrs, x, axes=None):
    axes = _ints(axes) if axes is not None else list(attrs["axes"])
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(attrs, x, axes=None):
    axes = _ints(axes) if axes is not None else attrs.get("axes")
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _gather(attrs, x, indices):
    axis = attrs.get("axis", 0) % x.dim()
    flat = torch.where(indices < 0, indices + x.shape[axis], indices)
    return torch.index_select(x, axis, flat.reshape(-1)).reshape(
        x.shape[:axis] + indices.shape + x.shape[axis + 1:])


def _where(attrs, condition, x, y):
    return torch.where(condition.bool(), x, y)


def _expand(attrs, x, shape):
    """ONNX Expand broadcasts both ways: `shape` may have fewer dims than x, or 1s where x is larger."""
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


def _range(attrs, start, limit, delta):
    """ORT's Range: n = ceil((limit - start) / delta), the subtraction in the inputs' type; each value is the
    previous one plus delta in that type (a running float sum, not start + i * delta)."""
    if delta.item() == 0:
        raise ValueError("Range with delta 0")
    count = max(0, math.ceil(float((limit - start).item()) / float(delta.item())))
    values = np.full(count, delta.item(), dtype=start.numpy().dtype)
    values[:1] = start.item()
    return torch.from_numpy(np.add.accumulate(values, dtype=values.dtype))


def _split(attrs, x, split=None):
    """Opset 13+ Split: part sizes from the `split` input, else num_outputs parts (see attributes()): equal
    ones, or at opset 18 ceil-sized ones with a smaller last part."""
    axis = attrs.get("axis", 0) % x.dim()
    if split is not None and split.numel():
        sizes = _ints(split)
    else:
        parts = attrs["num_outputs"]
        size = -(-x.shape[axis] // parts)
        sizes = [size] * (parts - 1) + [x.shape[axis] - size * (parts - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


def _running_sum(x, axis: int):
    """Float running sums along `axis`, one step at a time in x's type as ORT adds (torch.cumsum accumulates
    float32 in float64). In place: runs without autograd (see _ort_values)."""
    out = x.clone()
    for i in range(1, x.shape[axis]):
        out.select(axis, i).add_(out.select(axis, i - 1))
    return out


def _cumsum(attrs, x, axis):
    """Running sums along an axis (floats in ORT's order, see _running_sum); exclusive shifts by one step,
    reverse runs from the end."""
    axis = _ints(axis)[0] % x.dim()
    if x.shape[axis] == 0:
        return x
    reverse = bool(attrs.get("reverse", 0))
    if reverse:
        x = x.flip(axis)
    if x.is_floating_point():
        (out,) = _ort_values(lambda t: (_running_sum(t, axis),), lambda t: (torch.cumsum(t, axis),), x)
    else:
        out = torch.cumsum(x, axis, dtype=x.dtype)
    if attrs.get("exclusive", 0):
        out = torch.cat([torch.zeros_like(out.narrow(axis, 0, 1)), out.narrow(axis, 0, x.shape[axis] - 1)], axis)
    return out.flip(axis) if reverse else out


def _mod(attrs, a, b):
    """fmod=1: C's fmod (the dividend's sign); fmod=0 (integers only): the divisor's sign, as Python's %."""
    return torch.fmod(a, b) if attrs.get("fmod", 0) else torch.remainder(a, b)


def _prod(x, dim, keepdim):
    for axis in sorted(dim, reverse=True):  # torch.prod takes one dim at a time
        x = torch.prod(x, axis, keepdim=keepdim)
    return x


def _arg(fn):
    """ArgMax/ArgMin: int64 indices of the first extreme value, or of the last with select_last_index."""
    def run(attrs, x):
        axis = attrs.get("axis", 0) % x.dim()
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
        return fn(x, dim=axis, keepdim=keep)

    return run


def _trilu(attrs, x, k=None):
    k = int(k.item()) if k is not None and k.numel() else 0
    return torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k)


def _scatter_nd(attrs, data, indices, updates):
    """ScatterND: each index tuple in the last dim of `indices` picks a slice of data to overwrite (or
    combine, per `reduction`) with the matching slice of updates; negative indices count from the end."""
    depth = indices.shape[-1]
    lead = torch.tensor(data.shape[:depth], dtype=torch.int64, device=indices.device)
    index = indices.reshape(-1, depth).long()
    index = torch.where(index < 0, index + lead, index)
    strides = torch.tensor([int(np.prod(data.shape[i + 1:depth], dtype=np.int64)) for i in range(depth)],
                           device=indices.device)
    rows = (index * strides).sum(-1)
    flat = data.reshape(-1, *data.shape[depth:])
    values = updates.reshape(-1, *data.shape[depth:])
    reduction = _text(attrs, "reduction", "none")
    if reduction == "none":
        out = flat.index_copy(0, rows, values)
    elif reduction == "add":
        out = flat.index_add(0, rows, values)
    elif reduction in ("mul", "max", "min"):
        index = rows.reshape(-1, *[1] * (values.dim() - 1)).expand_as(values)
        out = flat.scatter_reduce(0, index, values, {"mul": "prod", "max": "amax", "min": "amin"}[reduction])
    else:
        raise NotImplementedError(f"ScatterND reduction {reduction}")
    return out.reshape(data.shape)


def _gather_elements(attrs, x, indices):
    axis = attrs.get("axis", 0) % x.dim()
    indices = indices.long()
    return torch.gather(x, axis, torch.where(indices < 0, indices + x.shape[axis], indices))


def _is_inf(attrs, x):
    positive = torch.isposinf(x) if attrs.get("detect_positive", 1) else torch.zeros_like(x, dtype=torch.bool)
    negative = torch.isneginf(x) if attrs.get("detect_negative", 1) else torch.zeros_like(x, dtype=torch.bool)
    return positive | negative


def _softplus(x):
    """ORT's form: x + log1p(exp(-x)) for x > 0, log1p(exp(x)) otherwise; no exp overflows either way."""
    return torch.relu(x) + torch.log1p(torch.exp(-x.abs()))


SQRT_HALF = float(np.float32(1 / math.sqrt(2)))
TANH_GELU_B = float(np.float32(math.sqrt(2 / math.pi)))  # ORT's FastGelu/Gelu(tanh) constants, as float32
TANH_GELU_C = float(np.float32(0.044715 * math.sqrt(2 / math.pi)))


def _gelu_erf(x):
    """0.5x(1 + erf(x/sqrt 2)) in ORT's order: erf(x * float32(1/sqrt 2)), then (0.5x) * (erf + 1)."""
    return (x * 0.5) * (torch.erf(x * SQRT_HALF) + 1.0)


def _gelu_tanh(x):
    """ORT's tanh Gelu: (0.5x) * (tanh(x * (C x x + B)) + 1), C and B its float32 constants."""
    return (x * 0.5) * (torch.tanh(x * (TANH_GELU_C * x * x + TANH_GELU_B)) + 1.0)


def _gelu(attrs, x):
    """ONNX Gelu (opset 20, approximate none/tanh) and com.microsoft Gelu (no attribute: the erf form)."""
    approximate = _text(attrs, "approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f"Gelu approximate={approximate}")
    return _gelu_tanh(x) if approximate == "tanh" else _gelu_erf(x)


def _one_hot(attrs, indices, depth, values):
    """OneHot: values[1] where the (negative-wrapped) index hits, values[0] elsewhere, incl. out-of-range."""
    depth = int(depth.reshape(-1)[0].item())
    index = indices.long()
    index = torch.where(index < 0, index + depth, index)
    hits = index.unsqueeze(-1) == torch.arange(depth, device=indices.device)
    axis = attrs.get("axis", -1) % (indices.dim() + 1)
    off, on = values.reshape(-1)
    return torch.where(hits.movedim(-1, axis), on, off)


def _sqrt(x):
    """Correctly rounded float32 square root, as ORT's: torch's own float32 sqrt (SLEEF, on AVX2 CPUs) can be
    an ulp off; the float64 root rounded to float32 never is."""
    return torch.sqrt(x.double()).float() if x.dtype == torch.float32 else torch.sqrt(x)


def _divide(t, value: float):
    """t / value rounded as a true division (torch turns division by a Python scalar into multiplication
    by its reciprocal, which can round differently)."""
    return t / torch.full_like(t, value)


class _ExactValues(torch.autograd.Function):
    """Forward: `exact`; backward: the gradient goes to `smooth`, as if it had been the output."""

    @staticmethod
    def forward(ctx, smooth, exact):
        return exact.view_as(exact)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _ort_values(exact_fn, smooth_fn, *inputs) -> tuple:
    """exact_fn(*inputs)'s outputs (ORT's operation order, run without autograd) carrying the gradient of
    smooth_fn(*inputs) (the same function in torch's own order): training back-propagates through fast
    native ops, not through the element-by-element loops that reproduce ORT's rounding."""
    with torch.no_grad():
        exact = exact_fn(*inputs)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        return exact
    return tuple(_ExactValues.apply(s, e) for s, e in zip(smooth_fn(*inputs), exact))


LAYER_NORM_LANES = 8  # the AVX2 kernel's float lanes; shorter rows take ORT's scalar (Welford) path


def _layer_norm_welford(x, scale, bias, eps: float):
    """ORT's scalar float32 layer norm of each row of x [rows, n] -> (y, mean [rows], inv_std [rows]):
    Welford's running mean and M2 in float32, std = sqrt(M2 / n + eps), y = (x - mean) / std * scale + bias.
    In place: runs without autograd (see _ort_values)."""
    columns = x.t().contiguous()
    mean, m2, count = (x.new_zeros(x.shape[0]) for _ in range(3))
    for k, column in enumerate(columns):
        delta = column - mean
        mean += delta / count.fill_(k + 1)
        m2 += delta * (column - mean)
    std = _sqrt(_divide(m2, x.shape[1]) + eps)
    y = (x - mean[:, None]) / std[:, None] * scale
    return (y if bias is None else y + bias), mean, 1.0 / std


def _layer_norm_avx2(x, scale, bias, eps: float):
    """MLAS's x86-64 AVX2 float32 layer norm of each row of x [rows, n >= 8], in its operation order: the mean
    from a float64 sum; the variance as a centred sum of squares in 8 FMA lanes, folded (0+4, 1+5, 2+6, 3+7)
    then (0+2)+(1+3), then the tail: 4 plain adds when 4+ remain, FMAs for the rest; inv_std =
    1 / sqrt(var + eps); y = fma((x - mean) * inv_std, scale, bias). An FMA is emulated in float64, which
    holds the product of two floats exactly."""
    rows, n = x.shape
    mean = _divide(torch.sum(x, -1, dtype=torch.float64), n).float()
    centred = x - mean[:, None]
    squares = centred.double().square()
    vector_end = n - n % LAYER_NORM_LANES
    lanes = squares[:, :vector_end].reshape(rows, -1, LAYER_NORM_LANES)
    acc = x.new_zeros(rows, LAYER_NORM_LANES)
    for step in range(lanes.shape[1]):
        acc = (acc.double() + lanes[:, step]).float()
    half = acc[:, :4] + acc[:, 4:]
    total = (half[:, 0] + half[:, 2]) + (half[:, 1] + half[:, 3])
    tail = vector_end
    if n - vector_end >= 4:
        for k in range(vector_end, vector_end + 4):
            total = total + centred[:, k] * centred[:, k]
        tail += 4
    for k in range(tail, n):
        total = (total.double() + squares[:, k]).float()
    inv_std = 1.0 / _sqrt(_divide(total, n) + eps)
    normalized = centred * inv_std[:, None]
    if bias is None:
        return normalized * scale, mean, inv_std
    return torch.addcmul(bias.double(), normalized.double(), scale.double()).float(), mean, inv_std


def _layer_norm_two_pass(x, scale, bias, eps: float):
    """EmbedLayerNormalization's float32 layer norm of each row of x [rows, n]: element-by-element float32
    sums of x, then of (x - mean)^2; e = sqrt(var + eps); y = (x - mean) / e * scale + bias. In place: runs
    without autograd (see _ort_values)."""
    total = x.new_zeros(x.shape[0])
    for column in x.t().contiguous():
        total += column
    mean = _divide(total, x.shape[1])
    centred = x - mean[:, None]
    squares = x.new_zeros(x.shape[0])
    for column in centred.t().contiguous():
        squares += column * column
    std = _sqrt(_divide(squares, x.shape[1]) + eps)
    y = centred / std[:, None] * scale
    return (y if bias is None else y + bias), mean, 1.0 / std


def _layer_norm_torch(x, scale, bias, eps: float):
    """Layer norm of each row of x [rows, n] in torch's own order -> (y, mean, inv_std)."""
    mean = x.mean(-1)
    inv_std = torch.rsqrt(((x - mean[:, None]) ** 2).mean(-1) + eps)
    y = (x - mean[:, None]) * inv_std[:, None] * scale
    return (y if bias is None else y + bias), mean, inv_std


def _layer_norm(x, scale, bias, axis: int, epsilon: float, kernel: str = "mlas"):
    """Layer norm over x's dims from `axis` on -> (y, mean, inv_std), the statistics shaped [d0..d(axis-1),
    1, ...]. float32 values are ORT 1.32's CPU kernels' bit for bit on x86-64, each op its own: "mlas" (ONNX
    LayerNormalization: MLAS's AVX2 kernel for rows of 8+ elements, else the scalar Welford path),
    "welford" (SkipLayerNormalization), "two_pass" (EmbedLayerNormalization); elsewhere (ARM, older ORT)
    they can differ by ulps. Gradients (and other float types) come from plain torch ops."""
    axis %= x.dim()
    rows = int(np.prod(x.shape[:axis], dtype=np.int64))
    stat_shape = (*x.shape[:axis], *[1] * (x.dim() - axis))
    flat = x.reshape(rows, -1)
    n = flat.shape[1]
    scale = scale.reshape(1, n) if scale.numel() == n else scale.broadcast_to(x.shape).reshape(rows, n)
    if bias is not None:
        bias = bias.reshape(1, n) if bias.numel() == n else bias.broadcast_to(x.shape).reshape(rows, n)
    eps = float(np.float32(epsilon)) if x.dtype == torch.float32 else epsilon
    if x.dtype != torch.float32:
        y, mean, inv_std = _layer_norm_torch(flat, scale, bias, eps)
    else:
        if kernel == "mlas":
            kernel = "avx2" if n >= LAYER_NORM_LANES else "welford"
        row_kernel = {"avx2": _layer_norm_avx2, "welford": _layer_norm_welford, "two_pass": _layer_norm_two_pass}
        y, mean, inv_std = _ort_values(lambda *a: row_kernel[kernel](*a, eps), lambda *a: _layer_norm_torch(*a, eps),
                                       flat, scale, bias)
    return y.reshape(x.shape), mean.reshape(stat_shape), inv_std.reshape(stat_shape)


def _layer_normalization(attrs, x, scale, bias=None):
    """ONNX LayerNormalization -> (Y, Mean, InvStdDev). stash_type is not consulted: like ORT's CPU kernel,
    float32 inputs get float32 statistics (with a float64 mean sum, see _layer_norm_avx2)."""
    return _layer_norm(x, scale, bias, attrs.get("axis", -1), attrs.get("epsilon", 1e-5))


def _skip_layer_normalization(attrs, x, skip, gamma, beta=None, bias=None):
    """com.microsoft SkipLayerNormalization -> (output, mean, inv_std_var, input_skip_bias_sum): layer norm
    over the last dim of (x + skip) + bias, skip broadcast from [S, H] or [1, S, H], in ORT 1.32's order
    (its scalar Welford path at every hidden size)."""
    total = x + skip
    if bias is not None:
        total = total + bias
    y, mean, inv_std = _layer_norm(total, gamma, beta, -1, attrs.get("epsilon", 1e-12), kernel="welford")
    return y, mean, inv_std, total


def _embed_layer_normalization(attrs, input_ids, segment_ids, word_embedding, position_embedding,
                               segment_embedding=None, gamma=None, beta=None, mask=None, position_ids=None):
    """com.microsoft EmbedLayerNormalization -> (output, mask_index, embedding_sum): layer norm of
    word[input_ids] + position[position_ids or 0..S-1] (+ segment[segment_ids]); mask_index (int32 [batch]) is
    the count of 1s in each row of `mask`, zeros without one."""
    batch, seq = input_ids.shape
    positions = (torch.arange(seq, device=input_ids.device) if position_ids is None else position_ids.long())
    positions = positions.expand(batch, seq)
    total = word_embedding[input_ids.long()] + position_embedding[positions]
    if segment_embedding is not None and segment_ids is not None:
        total = total + segment_embedding[segment_ids.long()]
    y, _, _ = _layer_norm(total, gamma, beta, -1, attrs.get("epsilon", 1e-12), kernel="two_pass")
    mask_index = ((mask == 1).sum(1, dtype=torch.int32) if mask is not None
                  else torch.zeros(batch, dtype=torch.int32, device=input_ids.device))
    return y, mask_index, total


def _fast_gelu(attrs, x, bias=None):
    """com.microsoft FastGelu: ORT's tanh Gelu of x (+ bias)."""
    return _gelu_tanh(x if bias is None else x + bias)


def _bias_gelu(attrs, x, bias):
    """com.microsoft BiasGelu: ORT's erf Gelu of x + bias."""
    return _gelu_erf(x + bias)


def _fused_matmul(attrs, a, b):
    """com.microsoft FusedMatMul: alpha * (A or A^T) @ (B or B^T), transposing the last two dims."""
    if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        raise NotImplementedError("FusedMatMul with transBatchA/transBatchB")
    if attrs.get("transA", 0):
        a = a.transpose(-1, -2)
    if attrs.get("transB", 0):
        b = b.transpose(-1, -2)
    return (a @ b) * attrs.get("alpha", 1.0)


def _attention_mask(mask_index, batch: int, seq: int, total: int, causal: bool, fill: float, dtype, device):
    """The additive [batch, S or 1, T] mask ORT's CPU Attention builds, or None: from mask_index [B] (key
    lengths: keys at or past the length are masked), [2B] (lengths, then start positions), [B, T] or
    [B, S, T] (raw 0/1: masked where <= 0), each masked key getting mask_filter_value; then causal (past +
    s < key) adds mask_filter_value again."""
    mask = None
    if mask_index is not None:
        keys = torch.arange(total, device=mask_index.device)
        if mask_index.dim() == 1 and mask_index.shape[0] in (batch, 2 * batch):
            masked = keys >= mask_index[:batch].long()[:, None]
            if mask_index.shape[0] == 2 * batch:
                masked = masked | (keys < mask_index[batch:].long()[:, None])
            masked = masked[:, None, :]
        elif mask_index.dim() == 2:
            masked = (mask_index <= 0)[:, None, :]
        elif mask_index.dim() == 3:
            masked = mask_index <= 0
        else:
            raise NotImplementedError(f"Attention mask_index of shape {list(mask_index.shape)}")
        mask = torch.where(masked, fill, 0.0).to(dtype)
    if causal:
        past = total - seq
        keys, queries = torch.arange(total, device=device), torch.arange(seq, device=device)
        future = keys[None, :] > past + queries[:, None]
        causal_mask = torch.where(future, fill, 0.0).to(dtype)[None]
        mask = causal_mask if mask is None else mask + causal_mask
    return mask


def _attention(attrs, x, weights, bias=None, mask_index=None, past=None, attention_bias=None,
               past_sequence_length=None):
    """com.microsoft Attention (ORT's CPU kernel) -> (output [B, S, v_hidden], present [2, B, N, T, head]):
    Q, K, V = x @ weights + bias split per qkv_hidden_sizes and heads; K, V appended to `past`;
    softmax(Q K^T * scale + attention_bias + mask) V, scale defaulting to 1/sqrt(head size) and the mask
    from mask_index and unidirectional (see _attention_mask)."""
    if attrs.get("past_present_share_buffer", 0) or attrs.get("do_rotary", 0) or past_sequence_length is not None:
        raise NotImplementedError("Attention with past_present_share_buffer or do_rotary")
    qkv = x @ weights
    if bias is not None:
        qkv = qkv + bias
    return attention_from_projection(attrs, qkv, mask_index, past, attention_bias)


def attention_from_projection(attrs, qkv, mask_index=None, past=None, attention_bias=None):
    """Attention after its input projection qkv = x @ weights + bias [B, S, Q + K + V sizes] (the part QAttention
    computes in integers): heads, past, scores, mask, softmax and context, as _attention."""
    heads = attrs["num_heads"]
    sizes = list(attrs.get("qkv_hidden_sizes") or [qkv.shape[-1] // 3] * 3)
    batch, seq = qkv.shape[:2]
    q, k, v = (part.reshape(batch, seq, heads, -1).transpose(1, 2) for part in qkv.split(sizes, -1))
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    total = k.shape[2]
    scale = attrs.get("scale", 0.0) or float(1 / np.sqrt(np.float32(q.shape[-1])))
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = _attention_mask(mask_index, batch, seq, total, bool(attrs.get("unidirectional", 0)) and seq > 1,
                           attrs.get("mask_filter_value", -10000.0), qkv.dtype, qkv.device)
    if attention_bias is not None:
        scores = scores + (attention_bias if mask is None else attention_bias + mask[:, None])
    elif mask is not None:
        scores = scores + mask[:, None]
    out = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, seq, -1)
    return (out, torch.stack([k, v])) if k.shape[-1] == v.shape[-1] else (out,)  # no present: K, V sizes differ


RNN_ACTIVATIONS = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh}


def _rnn_activations(attrs, op: str, defaults: list[str], directions: int):
    """The per-direction activation functions (Sigmoid and Tanh only; others raise NotImplementedError)."""
    names = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", defaults * directions)]
    unsupported = sorted(set(names) - set(RNN_ACTIVATIONS))
    if unsupported:
        raise NotImplementedError(f"{op} activation(s) {', '.join(unsupported)}")
    per = len(defaults)
    return [[RNN_ACTIVATIONS[n] for n in names[d * per:(d + 1) * per]] for d in range(directions)]


def _rnn(attrs, op: str, x, w, r, b, sequence_lens, initial_states, step, defaults: list[str], project=None):
    """The time loop shared by LSTM and GRU. x is [seq, batch, in] ([batch, seq, in] with layout=1); w, r, b
    hold one entry per direction; step(x_w_t, states, direction, w_bias, r_bias, acts) -> the new states
    (hidden state first), x_w_t being x[t] @ W^T and w_bias/r_bias B's two halves (None without B). Batch
    entry i runs only its first sequence_lens[i] steps (backwards in the reverse direction): Y is zero past
    that length and the final states are those after its last valid step (zero for an empty sequence).
    Returns (Y [seq, dirs, batch, hidden], each final state [dirs, batch, hidden]), batch-first for layout=1.
    project(x, d) gives the input projection x @ W[d]^T of every step at once (default: in float)."""
    layout = attrs.get("layout", 0)
    if layout:
        x = x.transpose(0, 1)
        initial_states = [None if s is None else s.transpose(0, 1) for s in initial_states]
    direction = _text(attrs, "direction", "forward")
    directions = 2 if direction == "bidirectional" else 1
    acts = _rnn_activations(attrs, op, defaults, directions)
    seq, batch = x.shape[:2]
    hidden = attrs.get("hidden_size", r.shape[-1])
    lengths = torch.full((batch,), seq, device=x.device) if sequence_lens is None else sequence_lens.long()
    ys, finals = [], []
    for d in range(directions):
        states = [x.new_zeros(batch, hidden) if s is None else s[d] for s in initial_states]
        x_w = x @ w[d].t() if project is None else project(x, d)
        w_bias, r_bias = (None, None) if b is None else b[d].chunk(2)
        outputs = [None] * seq
        times = range(seq - 1, -1, -1) if direction == "reverse" or d == 1 else range(seq)
        for t in times:
            valid = (t < lengths)[:, None]
            new = step(x_w[t], states, d, w_bias, r_bias, acts[d])
            states = [torch.where(valid, n, s) for n, s in zip(new, states)]
            outputs[t] = torch.where(valid, new[0], torch.zeros_like(new[0]))
        ys.append(torch.stack(outputs) if seq else x.new_zeros(0, batch, hidden))
        ran = (lengths > 0)[:, None]  # ORT zeroes the final states of empty sequences
        finals.append([torch.where(ran, s, torch.zeros_like(s)) for s in states])
    y = torch.stack(ys, 1)
    final = [torch.stack([f[k] for f in finals]) for k in range(len(initial_states))]
    if layout:
        return (y.permute(2, 0, 1, 3), *[s.transpose(0, 1) for s in final])
    return (y, *final)


def _clip_gate(attrs, x):
    clip = attrs.get("clip")
    return x if clip is None else torch.clamp(x, -clip, clip)


def _lstm(attrs, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    """ONNX LSTM -> (Y, Y_h, Y_c): gates i, o, f, c in W/R/B; optional peepholes P (i, o, f), input_forget
    (f = 1 - i) and clip (of every gate's input); sequence lengths and layout as in _rnn."""
    return lstm_forward(attrs, x, w, r, b, sequence_lens, initial_h, initial_c, p)


def lstm_forward(attrs, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None,
                 project=None, recur=None):
    """_lstm with the two products replaceable (the simulator's quantized LSTM): project(x, d) -> x @ W[d]^T
    for all steps, recur(h, d) -> h @ R[d]^T for one step; the gates add them, then the two biases, as ORT."""
    def step(x_w, states, d, w_bias, r_bias, acts):
        h, c = states
        f_act, g_act, h_act = acts
        gates = x_w + (h @ r[d].t() if recur is None else recur(h, d))
        if w_bias is not None:
            gates = gates + (w_bias + r_bias)
        i, o, f, cell = gates.chunk(4, -1)
        if p is not None:
            p_i, p_o, p_f = p[d].chunk(3)
            i, f = i + p_i * c, f + p_f * c
        i = f_act(_clip_gate(attrs, i))
        f = 1 - i if attrs.get("input_forget", 0) else f_act(_clip_gate(attrs, f))
        c_new = f * c + i * g_act(_clip_gate(attrs, cell))
        if p is not None:
            o = o + p_o * c_new
        return f_act(_clip_gate(attrs, o)) * h_act(c_new), c_new

    return _rnn(attrs, "LSTM", x, w, r, b, sequence_lens, [initial_h, initial_c], step, ["Sigmoid", "Tanh", "Tanh"],
                project)


def _gru(attrs, x, w, r, b=None, sequence_lens=None, initial_h=None):
    """ONNX GRU -> (Y, Y_h): gates z, r, h in W/R/B; linear_before_reset=1 applies the reset gate after the
    hidden state's product with R_h (and its bias) rather than before; clip, lengths and layout as LSTM's."""
    hidden = attrs.get("hidden_size", r.shape[-1])

    def step(x_w, states, d, w_bias, r_bias, acts):
        (h,) = states
        f_act, g_act = acts
        if w_bias is not None:
            x_w = x_w + w_bias
        x_z, x_r, x_h = x_w.chunk(3, -1)
        r_z, r_r, r_h = r[d].split(hidden)
        b_z, b_r, b_h = (None, None, None) if r_bias is None else r_bias.chunk(3)
        h_z, h_r = h @ r_z.t(), h @ r_r.t()
        if b_z is not None:
            h_z, h_r = h_z + b_z, h_r + b_r
        z = f_act(_clip_gate(attrs, x_z + h_z))
        reset = f_act(_clip_gate(attrs, x_r + h_r))
        if attrs.get("linear_before_reset", 0):
            h_h = h @ r_h.t() if b_h is None else h @ r_h.t() + b_h
            candidate = g_act(_clip_gate(attrs, x_h + reset * h_h))
        else:
            h_h = (reset * h) @ r_h.t() if b_h is None else (reset * h) @ r_h.t() + b_h
            candidate = g_act(_clip_gate(attrs, x_h + h_h))
        return ((1 - z) * candidate + z * h,)

    return _rnn(attrs, "GRU", x, w, r, b, sequence_lens, [initial_h], step, ["Sigmoid", "Tanh"])


OPS = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": lambda attrs, a, b: torch.pow(a, b).to(a.dtype),  # ONNX keeps the base's type
    "Max": lambda attrs, *xs: _fold(torch.maximum, xs),
    "Min": lambda attrs, *xs: _fold(torch.minimum, xs),
    "Relu": lambda attrs, x: torch.relu(x),
    "LeakyRelu": lambda attrs, x: F.leaky_relu(x, attrs.get("alpha", 0.01)),
    "Sigmoid": lambda attrs, x: torch.sigmoid(x), "Tanh": lambda attrs, x: torch.tanh(x),
    "HardSigmoid": lambda attrs, x: torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0, 1),
    "HardSwish": lambda attrs, x: F.hardswish(x), "Erf": lambda attrs, x: torch.erf(x),
    "Sqrt": lambda attrs, x: _sqrt(x), "Neg": lambda attrs, x: -x, "Exp": lambda attrs, x: torch.exp(x),
    "Clip": _clip, "Identity": lambda attrs, x: x, "Dropout": lambda attrs, x, *rest: x,
    "Softmax": lambda attrs, x: torch.softmax(x, dim=attrs.get("axis", -1)),
    "LogSoftmax": lambda attrs, x: torch.log_softmax(x, dim=attrs.get("axis", -1)),
    "Conv": _conv, "Gemm": _gemm, "MatMul": _binary(torch.matmul),
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": lambda attrs, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "BatchNormalization": _batch_norm,
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": lambda attrs, x: x.permute(*attrs["perm"]) if "perm" in attrs else x.permute(*reversed(range(x.dim()))),
    "Concat": lambda attrs, *xs: torch.cat(xs, dim=attrs["axis"]), "Slice": _slice, "Pad": _pad,
    "Constant": _constant, "ConstantOfShape": _constant_of_shape,
    "Cast": lambda attrs, x: x.to(ONNX_TO_TORCH_DTYPE[attrs["to"]]),
    "Shape": lambda attrs, x: torch.tensor(list(x.shape)[attrs.get("start", 0):attrs.get("end")], dtype=torch.int64),
    "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax), "ReduceMin": _reduce(torch.amin),
    "ReduceProd": _reduce(_prod),
    "ReduceL1": _reduce(lambda x, dim, keepdim: torch.sum(x.abs(), dim, keepdim=keepdim)),
    "ReduceL2": _reduce(lambda x, dim, keepdim: _sqrt(torch.sum(x * x, dim, keepdim=keepdim))),
    "ReduceSumSquare": _reduce(lambda x, dim, keepdim: torch.sum(x * x, dim, keepdim=keepdim)),
    "ReduceLogSum": _reduce(lambda x, dim, keepdim: torch.log(torch.sum(x, dim, keepdim=keepdim))),
    "ReduceLogSumExp": _reduce(torch.logsumexp),
    "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin),
    "Where": _where, "Expand": _expand, "Range": _range, "Tile": lambda attrs, x, repeats: x.repeat(*_ints(repeats)),
    "Split": _split, "CumSum": _cumsum, "Trilu": _trilu, "ScatterND": _scatter_nd,
    "GatherElements": _gather_elements, "OneHot": _one_hot,
    "Einsum": lambda attrs, *xs: torch.einsum(_text(attrs, "equation", "").replace(" ", ""), *xs),
    "NonZero": lambda attrs, x: torch.nonzero(x).t().contiguous(),
    "Size": lambda attrs, x: torch.tensor(x.numel(), dtype=torch.int64),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge),
    "Not": lambda attrs, x: torch.logical_not(x), "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "IsNaN": lambda attrs, x: torch.isnan(x), "IsInf": _is_inf,
    "Abs": lambda attrs, x: torch.abs(x), "Sign": lambda attrs, x: torch.sign(x),
    "Reciprocal": lambda attrs, x: torch.reciprocal(x), "Log": lambda attrs, x: torch.log(x),
    "Floor": lambda attrs, x: torch.floor(x), "Ceil": lambda attrs, x: torch.ceil(x), "Mod": _mod,
    "Softplus": lambda attrs, x: _softplus(x), "Mish": lambda attrs, x: x * torch.tanh(_softplus(x)),
    "Gelu": _gelu, "LayerNormalization": _layer_normalization,
    "SkipLayerNormalization": _skip_layer_normalization, "EmbedLayerNormalization": _embed_layer_normalization,
    "FastGelu": _fast_gelu, "BiasGelu": _bias_gelu, "FusedMatMul": _fused_matmul,
    "QuickGelu": lambda attrs, x: x * torch.sigmoid(x * attrs.get("alpha", 1.702)),
    "Attention": _attention, "LSTM": _lstm, "GRU": _gru,
}


def _fold(fn, xs):
    result = xs[0]
    for x in xs[1:]:
        result = fn(result, x)
    return result
