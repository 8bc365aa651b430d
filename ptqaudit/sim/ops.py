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
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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
    "Sqrt": lambda attrs, x: torch.sqrt(x), "Neg": lambda attrs, x: -x, "Exp": lambda attrs, x: torch.exp(x),
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
}


def _fold(fn, xs):
    result = xs[0]
    for x in xs[1:]:
        result = fn(result, x)
    return result
