"""The simulator's torch ops (ptqaudit.sim.ops.OPS) against ONNX Runtime, one tiny single-node model per
case, plus whole graphs run through SimModel with no policy (float) against ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ptqaudit.errors import PtqauditError
from ptqaudit.onnx_graph import load_model
from ptqaudit.sim.model import SimModel
from ptqaudit.sim.ops import OPS, attributes

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min
SAMPLE_MODELS = Path(__file__).resolve().parents[1] / "sample_models"

_RNG = np.random.default_rng(1234)


def rand(*shape, low=-2.0, high=2.0) -> np.ndarray:
    return _RNG.uniform(low, high, size=shape).astype(np.float32)


def grid(*shape, low=-2.0, high=2.0) -> np.ndarray:
    """Random multiples of 1/16: products and sums of these are exact in float32, so accumulating
    ops (Conv, Gemm, MatMul, pools) compare exactly whatever order the kernels add in."""
    return (np.round(_RNG.uniform(low, high, size=shape) * 16) / 16).astype(np.float32)


def i64(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(value) -> np.ndarray:
    return np.array(value, dtype=np.float32)


# --- running one node in ORT and through OPS ------------------------------------------------------


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def single_node(op_type: str, inputs, attrs: dict, opset: int):
    """(model, node, feeds) for one node whose non-None inputs are graph inputs; None -> absent ("")."""
    names, feeds, graph_inputs = [], {}, []
    for i, value in enumerate(inputs):
        if value is None:
            names.append("")
            continue
        value = np.asarray(value)
        name = f"in{i}"
        names.append(name)
        feeds[name] = value
        elem = helper.np_dtype_to_tensor_dtype(value.dtype)
        graph_inputs.append(helper.make_tensor_value_info(name, elem, list(value.shape)))
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(op_type, names, ["out"], name="node", **attrs)
    graph = helper.make_graph([node], "single", graph_inputs, [onnx.ValueInfoProto(name="out")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model, node, feeds


def run_op(node: onnx.NodeProto, inputs) -> torch.Tensor:
    """The op through OPS, as SimModel calls it: attributes(node) and torch inputs (None when absent)."""
    args = [None if v is None else torch.from_numpy(np.array(v)) for v in inputs]
    while args and args[-1] is None:
        args.pop()
    out = OPS[node.op_type](attributes(node), *args)
    return out[0] if isinstance(out, tuple) else out


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, f"shape {actual.shape} != ORT {expected.shape}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != ORT {expected.dtype}"
    if np.issubdtype(expected.dtype, np.floating):
        assert np.allclose(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True), (
            f"max abs diff {np.nanmax(np.abs(actual.astype(np.float64) - expected)) if actual.size else 0}\n"
            f"sim={actual}\nort={expected}")
    else:
        np.testing.assert_array_equal(actual, expected)


def check_op(op_type: str, inputs, attrs: dict | None = None, opset: int = 17) -> None:
    model, node, feeds = single_node(op_type, inputs, attrs or {}, opset)
    expected = _session(model).run(["out"], feeds)[0]
    actual = run_op(node, inputs).detach().numpy()
    assert_same(np.asarray(actual), np.asarray(expected))


# --- the cases: pytest.param(op_type, inputs, attrs[, opset], id=...) ------------------------------

def case(id, op, inputs, opset=17, marks=(), **attrs):
    return pytest.param(op, inputs, attrs, opset, id=id, marks=marks)


X4 = grid(2, 4, 7, 7)
W4 = grid(6, 4, 3, 3)
B6 = grid(6)

CONV = [
    case("conv-default", "Conv", [X4, W4, B6]),
    case("conv-no-bias", "Conv", [X4, W4]),
    case("conv-pads-sym", "Conv", [X4, W4, B6], pads=[1, 1, 1, 1]),
    case("conv-pads-asym", "Conv", [X4, W4, B6], pads=[0, 1, 2, 1]),
    case("conv-strides", "Conv", [X4, W4, B6], strides=[2, 2], pads=[1, 1, 1, 1]),
    case("conv-strides-pads-asym", "Conv", [X4, W4, B6], strides=[2, 1], pads=[1, 0, 0, 2]),
    case("conv-dilations", "Conv", [X4, W4, B6], dilations=[2, 2], pads=[2, 2, 2, 2]),
    case("conv-dilations-strides", "Conv", [X4, W4, B6], dilations=[2, 1], strides=[1, 2], pads=[1, 0, 1, 1]),
    case("conv-kernel-shape-attr", "Conv", [X4, W4, B6], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    case("conv-group2", "Conv", [X4, grid(6, 2, 3, 3), B6], group=2, pads=[1, 1, 1, 1]),
    case("conv-depthwise", "Conv", [X4, grid(8, 1, 3, 3), grid(8)], group=4, pads=[1, 1, 1, 1]),
    case("conv-same-upper-sym", "Conv", [X4, W4, B6], auto_pad="SAME_UPPER"),
    case("conv-same-upper-asym", "Conv", [X4, grid(6, 4, 2, 2), B6], auto_pad="SAME_UPPER", strides=[2, 2]),
    case("conv-same-lower-asym", "Conv", [X4, grid(6, 4, 2, 2), B6], auto_pad="SAME_LOWER", strides=[2, 2]),
    case("conv-same-upper-even-kernel", "Conv", [X4, grid(6, 4, 4, 4), B6], auto_pad="SAME_UPPER"),
    case("conv-same-lower-even-kernel", "Conv", [X4, grid(6, 4, 4, 4), B6], auto_pad="SAME_LOWER"),
    case("conv-same-lower-k3-s2", "Conv", [grid(1, 2, 6, 6), grid(3, 2, 3, 3)], auto_pad="SAME_LOWER", strides=[2, 2]),
    case("conv-valid", "Conv", [X4, W4, B6], auto_pad="VALID", strides=[2, 2]),
    case("conv1d-pads-asym-strides", "Conv", [grid(2, 3, 10), grid(5, 3, 3), grid(5)], pads=[1, 2], strides=[2]),
    case("conv1d-same-upper", "Conv", [grid(2, 3, 10), grid(5, 3, 4)], auto_pad="SAME_UPPER"),
    case("conv3d-pads-asym", "Conv", [grid(1, 2, 4, 4, 4), grid(3, 2, 2, 2, 2)], pads=[0, 1, 0, 1, 0, 1]),
]

X3 = grid(2, 3, 7, 7)
POOL = [
    case("maxpool-k2", "MaxPool", [X3], kernel_shape=[2, 2]),
    case("maxpool-k3-s2-pads", "MaxPool", [X3], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    case("maxpool-pads-asym", "MaxPool", [X3], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 1, 1, 0]),
    case("maxpool-ceil", "MaxPool", [X3], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    case("maxpool-ceil-pads", "MaxPool", [grid(1, 2, 5, 5)], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
         ceil_mode=1),
    case("maxpool-ceil-pads-asym", "MaxPool", [grid(1, 2, 6, 6)], kernel_shape=[3, 3], strides=[2, 2],
         pads=[0, 0, 1, 1], ceil_mode=1),
    case("maxpool-ceil-window-in-right-pad", "MaxPool", [grid(1, 1, 5, 5)], kernel_shape=[2, 2], strides=[2, 2],
         pads=[1, 1, 1, 1], ceil_mode=1),
    case("maxpool-dilations", "MaxPool", [X3], kernel_shape=[2, 2], dilations=[2, 2]),
    case("maxpool-same-upper", "MaxPool", [X3], kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    case("maxpool-same-lower", "MaxPool", [X3], kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER"),
    case("maxpool-same-lower-k3-s2", "MaxPool", [grid(1, 1, 6, 6)], kernel_shape=[3, 3], strides=[2, 2],
         auto_pad="SAME_LOWER"),
    case("maxpool1d", "MaxPool", [grid(2, 3, 9)], kernel_shape=[3], strides=[2], pads=[1, 1]),
    case("avgpool-k3", "AveragePool", [X3], kernel_shape=[3, 3]),
    case("avgpool-pads-exclude", "AveragePool", [X3], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    case("avgpool-pads-include", "AveragePool", [X3], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
    case("avgpool-strides-pads", "AveragePool", [X3], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    case("avgpool-ceil", "AveragePool", [X3], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    case("avgpool-ceil-pads-exclude", "AveragePool", [X3], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
         ceil_mode=1),
    case("avgpool-ceil-pads-include", "AveragePool", [grid(1, 2, 6, 6)], kernel_shape=[3, 3], strides=[2, 2],
         pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1),
    case("avgpool-ceil-pads-include-k2", "AveragePool", [grid(1, 1, 6, 6)], kernel_shape=[2, 2], strides=[2, 2],
         pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1),
    case("avgpool-pads-asym", "AveragePool", [grid(1, 1, 5, 5)], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
    case("avgpool-same-upper-asym", "AveragePool", [grid(1, 1, 5, 5)], kernel_shape=[2, 2], strides=[2, 2],
         auto_pad="SAME_UPPER"),
    case("avgpool1d", "AveragePool", [grid(2, 3, 9)], kernel_shape=[3], strides=[2], pads=[1, 1],
         count_include_pad=1),
    case("globalavgpool", "GlobalAveragePool", [X3]),
    case("globalavgpool-1d", "GlobalAveragePool", [grid(2, 3, 9)]),
    case("globalmaxpool", "GlobalMaxPool", [X3]),
    case("globalmaxpool-1d", "GlobalMaxPool", [grid(2, 3, 9)]),
]

A, B = grid(3, 4), grid(4, 5)
GEMM = [
    case("gemm-c-vector", "Gemm", [A, B, grid(5)]),
    case("gemm-no-c", "Gemm", [A, B]),
    case("gemm-transA", "Gemm", [grid(4, 3), B, grid(5)], transA=1),
    case("gemm-transB", "Gemm", [A, grid(5, 4), grid(5)], transB=1),
    case("gemm-transA-transB", "Gemm", [grid(4, 3), grid(5, 4)], transA=1, transB=1),
    case("gemm-alpha-beta-c-full", "Gemm", [A, B, grid(3, 5)], alpha=0.5, beta=2.0),
    case("gemm-c-column", "Gemm", [A, B, grid(3, 1)], beta=-1.5),
    case("gemm-c-row", "Gemm", [A, B, grid(1, 5)]),
    case("gemm-c-scalar", "Gemm", [A, B, f32(0.75)], alpha=2.0),
    case("gemm-beta-no-c", "Gemm", [A, B], beta=3.0),
    case("matmul-2d", "MatMul", [A, B]),
    case("matmul-batched-3d", "MatMul", [grid(2, 3, 4), grid(2, 4, 5)]),
    case("matmul-3d-by-2d", "MatMul", [grid(2, 3, 4), B]),
    case("matmul-1d-by-2d", "MatMul", [grid(4), B]),
    case("matmul-2d-by-1d", "MatMul", [A, grid(4)]),
]

XS = rand(4, 5, 6)
SLICE = [
    case("slice-axis0", "Slice", [XS, i64(1), i64(3), i64(0)]),
    case("slice-negative-starts-ends", "Slice", [XS, i64(-3), i64(-1), i64(1)]),
    case("slice-negative-axis", "Slice", [XS, i64(1), i64(-2), i64(-1)]),
    case("slice-steps", "Slice", [XS, i64(0, 1), i64(4, 6), i64(0, 2), i64(2, 2)]),
    case("slice-steps-3", "Slice", [XS, i64(1), i64(6), i64(2), i64(3)]),
    case("slice-axes-omitted", "Slice", [XS, i64(1, 0), i64(3, 4)]),
    case("slice-axes-omitted-steps", "Slice", [XS, i64(0, 1), i64(4, 5), None, i64(3, 2)]),
    case("slice-end-int64-max", "Slice", [XS, i64(1), i64(INT64_MAX), i64(2)]),
    case("slice-start-int64-min", "Slice", [XS, i64(INT64_MIN), i64(2), i64(2)]),
    case("slice-out-of-range-empty", "Slice", [XS, i64(10), i64(20), i64(1)]),
    case("slice-reversed-empty", "Slice", [XS, i64(3), i64(1), i64(1)]),
    case("slice-neg-step-flip", "Slice", [XS, i64(-1), i64(INT64_MIN), i64(0), i64(-1)]),
    case("slice-neg-step-2", "Slice", [XS, i64(4), i64(0), i64(1), i64(-2)]),
    case("slice-neg-step-start-max", "Slice", [XS, i64(INT64_MAX), i64(-100), i64(2), i64(-3)]),
    case("slice-neg-step-partial", "Slice", [XS, i64(-2), i64(1), i64(2), i64(-1)]),
    case("slice-neg-step-end-minus1", "Slice", [XS, i64(3), i64(-1), i64(1), i64(-1)]),
    case("slice-neg-step-two-axes", "Slice", [XS, i64(0, -1), i64(3, 0), i64(0, 2), i64(1, -2)]),
    case("slice-neg-step-start-below-range", "Slice", [XS, i64(-100), i64(-200), i64(1), i64(-1)]),
    case("slice-int64-data", "Slice", [i64(2, 3, 4, 5), i64(-2), i64(INT64_MAX), i64(0)]),
]

XP = rand(1, 2, 3, 4)
PAD = [
    case("pad-constant-value", "Pad", [XP, i64(0, 0, 1, 2, 0, 0, 2, 1), f32(1.5)]),
    case("pad-constant-default", "Pad", [XP, i64(0, 1, 1, 0, 1, 0, 0, 1)]),
    case("pad-constant-negative-crop", "Pad", [XP, i64(0, 0, -1, 1, 0, 0, 0, -2), f32(-3.0)]),
    case("pad-reflect", "Pad", [XP, i64(0, 0, 1, 2, 0, 0, 2, 1)], mode="reflect"),
    case("pad-edge", "Pad", [XP, i64(0, 0, 2, 1, 0, 0, 1, 3)], mode="edge"),
    case("pad-edge-batch-channel", "Pad", [XP, i64(1, 0, 0, 0, 0, 1, 0, 0)], mode="edge"),
    case("pad-edge-int64-2d", "Pad", [i64(1, 2, 3).reshape(1, 3), i64(0, 1, 0, 2)], mode="edge"),
    case("pad-constant-int64", "Pad", [i64(1, 2, 3), i64(1, 1), i64(9)]),
    case("pad-opset18-axes", "Pad", [XP, i64(1, 2, 2, 1), f32(0.5), i64(2, 3)], opset=18),
    case("pad-opset18-negative-axes", "Pad", [XP, i64(1, 3), None, i64(-1)], opset=18),
    case("pad-opset18-axes-reflect", "Pad", [XP, i64(1, 2, 2, 1), None, i64(3, 2)], opset=18, mode="reflect"),
    case("pad-opset18-axes-edge", "Pad", [XP, i64(2, 1), None, i64(-2)], opset=18, mode="edge"),
]

XR = rand(2, 3, 4)
SHAPES = [
    case("reshape-0-minus1", "Reshape", [XR, i64(0, -1)]),
    case("reshape-minus1-0", "Reshape", [XR, i64(-1, 0)]),
    case("reshape-0-in-middle", "Reshape", [XR, i64(4, 0, 2)]),
    case("reshape-flat", "Reshape", [XR, i64(24)]),
    case("reshape-4d", "Reshape", [XR, i64(2, 1, 3, 4)]),
    case("reshape-int64-data", "Reshape", [i64(1, 2, 3, 4), i64(2, -1)]),
    case("flatten-default", "Flatten", [rand(2, 3, 4, 5)]),
    case("flatten-axis0", "Flatten", [rand(2, 3, 4, 5)], axis=0),
    case("flatten-axis1", "Flatten", [rand(2, 3, 4, 5)], axis=1),
    case("flatten-axis2", "Flatten", [rand(2, 3, 4, 5)], axis=2),
    case("flatten-axis-minus1", "Flatten", [rand(2, 3, 4, 5)], axis=-1),
    case("flatten-axis-minus4", "Flatten", [rand(2, 3, 4, 5)], axis=-4),
    case("flatten-axis-rank", "Flatten", [rand(2, 3, 4, 5)], axis=4),
    case("transpose-perm", "Transpose", [rand(2, 3, 4, 5)], perm=[0, 2, 3, 1]),
    case("transpose-default", "Transpose", [rand(2, 3, 4)]),
    case("concat-axis1-3-inputs", "Concat", [rand(2, 1, 3), rand(2, 2, 3), rand(2, 4, 3)], axis=1),
    case("concat-axis-negative", "Concat", [rand(2, 3, 1), rand(2, 3, 2)], axis=-1),
    case("concat-int64", "Concat", [i64(-1), i64(3, 4)], axis=0),
    case("gather-negative-indices", "Gather", [rand(5, 4), i64(0, -1, 2)]),
    case("gather-axis1-2d-indices", "Gather", [rand(5, 4), i64(1, -2, 0, 3).reshape(2, 2)], axis=1),
    case("gather-axis-negative", "Gather", [rand(3, 5, 4), i64(2, -5)], axis=-2),
    case("gather-scalar-index", "Gather", [rand(5, 4), np.array(-2, dtype=np.int64)]),
    case("gather-scalar-index-axis1", "Gather", [rand(5, 4), np.array(3, dtype=np.int64)], axis=1),
    case("gather-shape-vector", "Gather", [i64(8, 3, 32, 32), np.array(0, dtype=np.int64)]),
    case("gather-int32-indices", "Gather", [rand(5, 4), np.array([4, -1], dtype=np.int32)]),
    case("unsqueeze-axis0", "Unsqueeze", [rand(3, 4), i64(0)]),
    case("unsqueeze-axis-minus1", "Unsqueeze", [rand(3, 4), i64(-1)]),
    case("unsqueeze-two-axes", "Unsqueeze", [rand(3, 4), i64(0, 3)]),
    case("unsqueeze-two-axes-negative", "Unsqueeze", [rand(3, 4), i64(-1, 1)]),
    case("unsqueeze-scalar", "Unsqueeze", [np.array(7, dtype=np.int64), i64(0)]),
    case("squeeze-axis0", "Squeeze", [rand(1, 3, 1, 4), i64(0)]),
    case("squeeze-axis-negative", "Squeeze", [rand(1, 3, 1, 4), i64(-2)]),
    case("squeeze-two-axes", "Squeeze", [rand(1, 3, 1, 4), i64(2, 0)]),
    case("squeeze-no-axes", "Squeeze", [rand(1, 3, 1, 4)]),
    case("shape", "Shape", [XR]),
    case("shape-start", "Shape", [XR], start=1),
    case("shape-start-end", "Shape", [XR], start=-2, end=-1),
    case("constant-of-shape-default", "ConstantOfShape", [i64(2, 3)]),
    case("constant-of-shape-float", "ConstantOfShape", [i64(2, 3)],
         value=numpy_helper.from_array(f32([1.5]))),
    case("constant-of-shape-int64", "ConstantOfShape", [i64(4)],
         value=numpy_helper.from_array(i64(7))),
    case("constant-of-shape-scalar", "ConstantOfShape", [np.zeros(0, dtype=np.int64)],
         value=numpy_helper.from_array(f32([2.0]))),
    case("constant-value-tensor", "Constant", [], value=numpy_helper.from_array(rand(2, 3))),
    case("constant-value-tensor-int64", "Constant", [], value=numpy_helper.from_array(i64(-1, 4, 0))),
    case("constant-value-float", "Constant", [], value_float=0.25),
    case("constant-value-floats", "Constant", [], value_floats=[0.5, -1.0]),
    case("constant-value-int", "Constant", [], value_int=-3),
    case("constant-value-ints", "Constant", [], value_ints=[1, -1, 3]),
]

XD = rand(2, 3, 4)
REDUCE = [
    *[case(f"{op.lower()}-{name}", op, [XD], **attrs)
      for op in ("ReduceMean", "ReduceMax", "ReduceMin")
      for name, attrs in [("axis1-keep", dict(axes=[1])), ("axis1-nokeep", dict(axes=[1], keepdims=0)),
                          ("axes-neg-nokeep", dict(axes=[-1, 0], keepdims=0)),
                          ("no-axes-keep", {}), ("no-axes-nokeep", dict(keepdims=0))]],
    case("reducesum-axis1-keep", "ReduceSum", [XD, i64(1)]),
    case("reducesum-axis1-nokeep", "ReduceSum", [XD, i64(1)], keepdims=0),
    case("reducesum-axes-neg-nokeep", "ReduceSum", [XD, i64(-1, 0)], keepdims=0),
    case("reducesum-no-axes-keep", "ReduceSum", [XD]),
    case("reducesum-no-axes-nokeep", "ReduceSum", [XD], keepdims=0),
    case("reducesum-empty-axes", "ReduceSum", [XD, np.zeros(0, dtype=np.int64)], keepdims=0),
    case("reducesum-int64", "ReduceSum", [i64(1, 2, 3, 4).reshape(2, 2), i64(0)], keepdims=0),
    case("reducesum-noop-with-empty-axes", "ReduceSum", [XD], noop_with_empty_axes=1),
    case("reducesum-int32", "ReduceSum", [np.arange(6, dtype=np.int32).reshape(2, 3), i64(1)]),
    case("reducemean-int32", "ReduceMean", [np.arange(6, dtype=np.int32).reshape(2, 3)], axes=[1]),
    case("reducemax-int64", "ReduceMax", [i64(1, 5, 3, -4).reshape(2, 2)], axes=[1]),
]

XE = rand(3, 4)
ELEMENTWISE = [
    case("clip-min-max", "Clip", [XE, f32(-0.5), f32(0.7)]),
    case("clip-min-only", "Clip", [XE, f32(-0.5)]),
    case("clip-max-only", "Clip", [XE, None, f32(0.3)]),
    case("clip-none", "Clip", [XE]),
    case("clip-int64", "Clip", [i64(-5, 0, 5), i64(-1), i64(2)]),
    case("clip-relu6", "Clip", [rand(3, 4, low=-8, high=8), f32(0.0), f32(6.0)]),
    case("cast-float-int64", "Cast", [f32([-2.7, -0.5, 0.5, 1.9, 3.0])], to=TensorProto.INT64),
    case("cast-float-int32", "Cast", [f32([-2.7, -0.5, 0.5, 1.9, 3.0])], to=TensorProto.INT32),
    case("cast-float-uint8", "Cast", [f32([0.0, 1.9, 200.5, 255.0])], to=TensorProto.UINT8),
    case("cast-int64-float", "Cast", [i64(-3, 0, 7)], to=TensorProto.FLOAT),
    case("cast-float-double", "Cast", [XE], to=TensorProto.DOUBLE),
    case("cast-float-float16", "Cast", [XE], to=TensorProto.FLOAT16),
    case("cast-float-bool", "Cast", [f32([0.0, -1.0, 0.25])], to=TensorProto.BOOL),
    case("cast-float-int16", "Cast", [f32([1.0, -2.5])], to=TensorProto.INT16),
    case("cast-int64-int64", "Cast", [i64(1, 2)], to=TensorProto.INT64),
    case("batchnorm-4d", "BatchNormalization",
         [rand(2, 3, 4, 4), rand(3), rand(3), rand(3), rand(3, low=0.1, high=2.0)]),
    case("batchnorm-epsilon", "BatchNormalization",
         [rand(2, 3, 5), rand(3), rand(3), rand(3), rand(3, low=0.01, high=0.1)], epsilon=1e-2),
    case("batchnorm-2d", "BatchNormalization", [rand(4, 3), rand(3), rand(3), rand(3), rand(3, low=0.1, high=2.0)]),
    case("softmax-default", "Softmax", [XD]),
    case("softmax-axis1", "Softmax", [XD], axis=1),
    case("softmax-axis0", "Softmax", [XD], axis=0),
    case("softmax-1d", "Softmax", [rand(5)]),
    case("logsoftmax-default", "LogSoftmax", [XD]),
    case("logsoftmax-axis1", "LogSoftmax", [XD], axis=1),
    case("div-float", "Div", [XE, rand(3, 4, low=0.5, high=2.0)]),
    case("div-int64-trunc", "Div", [i64(-7, 7, -7, 7, 5, -5, 0, -1), i64(2, 2, -2, -2, 3, 3, 4, 3)]),
    case("div-int32-trunc", "Div", [np.array([-9, 9, -1], dtype=np.int32), np.array([4, -4, 2], dtype=np.int32)]),
    case("div-int64-broadcast", "Div", [i64(-32, 33, 31), np.array(-8, dtype=np.int64)]),
    case("max-3-inputs", "Max", [rand(3, 4), rand(4), rand(1, 4)]),
    case("min-3-inputs", "Min", [rand(3, 4), rand(4), rand(3, 1)]),
    case("max-1-input", "Max", [XE]),
    case("min-int64", "Min", [i64(3, -2, 5), i64(1, 4, -6)]),
    case("leakyrelu-default", "LeakyRelu", [XE]),
    case("leakyrelu-alpha", "LeakyRelu", [XE], alpha=0.2),
    case("hardsigmoid-default", "HardSigmoid", [rand(3, 4, low=-4, high=4)]),
    case("hardsigmoid-alpha-beta", "HardSigmoid", [rand(3, 4, low=-4, high=4)], alpha=1 / 6, beta=0.5),
    case("hardswish", "HardSwish", [rand(3, 4, low=-5, high=5)]),
    case("erf", "Erf", [XE]),
    case("sqrt", "Sqrt", [rand(3, 4, low=0.0, high=5.0)]),
    case("neg", "Neg", [XE]),
    case("neg-int64", "Neg", [i64(3, -2, 0)]),
    case("exp", "Exp", [XE]),
    case("sigmoid", "Sigmoid", [rand(3, 4, low=-8, high=8)]),
    case("tanh", "Tanh", [XE]),
    case("relu", "Relu", [XE]),
    case("identity", "Identity", [XE]),
    case("identity-int64", "Identity", [i64(1, 2)]),
    case("dropout", "Dropout", [XE]),
    case("dropout-ratio-training-false", "Dropout", [XE, f32(0.3), np.array(False)]),
    case("pow-float", "Pow", [rand(3, 4, low=0.1, high=3.0), rand(3, 4)]),
    case("pow-scalar-exponent", "Pow", [XE, f32(2.0)]),
    case("pow-int64-exponent", "Pow", [XE, i64(3)]),
    case("pow-int-base-float-exponent", "Pow", [i64(2, 3), f32([2.0, 0.5])]),
    case("add-broadcast", "Add", [XD, rand(4)]),
    case("add-broadcast-both", "Add", [rand(2, 1, 4), rand(3, 1)]),
    case("add-int64", "Add", [i64(1, 2, 3), np.array(-5, dtype=np.int64)]),
    case("sub-broadcast", "Sub", [rand(2, 3, 1, 1), rand(3, 1, 1)]),
    case("sub-scalar", "Sub", [XE, f32(0.5)]),
    case("mul-broadcast", "Mul", [rand(2, 1, 4), rand(3, 1)]),
    case("mul-int64", "Mul", [i64(2, -3), i64(4)]),
]

OLD_OPSETS = [
    case("unsqueeze-opset11-attr", "Unsqueeze", [rand(3, 4)], opset=11, axes=[0, -1]),
    case("squeeze-opset11-attr", "Squeeze", [rand(1, 3, 1)], opset=11, axes=[0]),
    case("reducesum-opset11-attr", "ReduceSum", [XD], opset=11, axes=[1], keepdims=0),
    case("clip-opset6-attr", "Clip", [XE], opset=6, min=-0.5, max=0.5),
    case("dropout-opset7-ratio", "Dropout", [XE], opset=7, ratio=0.3),
    case("softmax-opset11-2d", "Softmax", [XE], opset=11),
]

# ops whose older versions differ in semantics or signature: SimModel converts graphs below opset 13 first
UPGRADED_OLD_OPSETS = [
    ("softmax-opset11-3d", "Softmax", XD, 11, {"axis": 1}),
    ("logsoftmax-opset11-3d", "LogSoftmax", XD, 11, {}),
    ("slice-opset9-attrs", "Slice", rand(4, 5), 9, {"starts": [1], "ends": [3]}),
    ("pad-opset10-value-attr", "Pad", rand(2, 3), 10, {"pads": [1, 1, 1, 1], "value": 2.0}),
]

ALL_CASES = CONV + POOL + GEMM + SLICE + PAD + SHAPES + REDUCE + ELEMENTWISE + OLD_OPSETS


@pytest.mark.parametrize("op_type, inputs, attrs, opset", ALL_CASES)
def test_op_matches_onnxruntime(op_type, inputs, attrs, opset):
    check_op(op_type, inputs, attrs, opset)


def test_every_op_is_covered():
    covered = {p.values[0] for p in ALL_CASES}
    assert sorted(set(OPS) - covered) == []


# --- whole graphs through SimModel (no policy: float) --------------------------------------------


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def _sim_vs_ort(path: Path, x: np.ndarray, sim: SimModel | None = None) -> tuple[np.ndarray, np.ndarray]:
    sim = sim or SimModel(load_model(path))
    with torch.no_grad():
        actual = sim(torch.from_numpy(x)).numpy()
    expected = _session(onnx.load(str(path))).run(None, {"input": x})[0]
    return actual, expected


def _classifier(nodes, inits, name="g", input_shape=("batch", 1, 6, 6), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_graph_folds_constant_pad_subgraph(tmp_path):
    """torch.onnx's export of F.pad(x, [1, 2, 0, 1]): the pads come from a constant sub-graph
    (ConstantOfShape/Concat/Reshape/Slice/Transpose/Reshape/Cast) that must be folded."""
    inits = [
        numpy_helper.from_array(i64(1, 2, 0, 1), "pad_list"),
        numpy_helper.from_array(i64(4), "zeros_shape"),
        numpy_helper.from_array(i64(-1, 2), "pairs_shape"),
        numpy_helper.from_array(i64(-1), "s_start"),
        numpy_helper.from_array(i64(INT64_MIN), "s_end"),
        numpy_helper.from_array(i64(0), "s_axis"),
        numpy_helper.from_array(i64(-1), "s_step"),
        numpy_helper.from_array(i64(-1), "flat_shape"),
        numpy_helper.from_array(rand(2, 1, 3, 3), "conv_w"),
        numpy_helper.from_array(rand(2), "conv_b"),
        numpy_helper.from_array(rand(3, 2 * 5 * 7), "fc_w"),
        numpy_helper.from_array(rand(3), "fc_b"),
    ]
    nodes = [
        helper.make_node("ConstantOfShape", ["zeros_shape"], ["zeros"], name="cos",
                         value=numpy_helper.from_array(i64(0))),
        helper.make_node("Concat", ["pad_list", "zeros"], ["pads8"], name="concat", axis=0),
        helper.make_node("Reshape", ["pads8", "pairs_shape"], ["pairs"], name="reshape_pairs"),
        helper.make_node("Slice", ["pairs", "s_start", "s_end", "s_axis", "s_step"], ["pairs_rev"], name="slice"),
        helper.make_node("Transpose", ["pairs_rev"], ["pairs_t"], name="transpose", perm=[1, 0]),
        helper.make_node("Reshape", ["pairs_t", "flat_shape"], ["pads_flat"], name="reshape_flat"),
        helper.make_node("Cast", ["pads_flat"], ["pads"], name="cast", to=TensorProto.INT64),
        helper.make_node("Constant", [], ["pad_value"], name="pad_value", value_float=0.25),
        helper.make_node("Pad", ["input", "pads", "pad_value"], ["padded"], name="pad", mode="constant"),
        helper.make_node("Conv", ["padded", "conv_w", "conv_b"], ["conv_out"], name="conv"),
        helper.make_node("Relu", ["conv_out"], ["relu"], name="relu"),
        helper.make_node("Flatten", ["relu"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    path = _save(_classifier(nodes, inits), tmp_path / "pad.onnx")
    sim = SimModel(load_model(path))
    assert [s.op_type for s in sim.steps] == ["Pad", "Conv", "Relu", "Flatten", "Gemm"]
    assert sim._constants["pads"].tolist() == [0, 0, 0, 1, 0, 0, 1, 2]
    actual, expected = _sim_vs_ort(path, rand(4, 1, 6, 6), sim)
    assert_same(actual, expected)


def test_graph_batch_dependent_reshape(tmp_path):
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape on the input's batch size: run at two sizes."""
    inits = [
        numpy_helper.from_array(rand(2, 1, 3, 3), "conv_w"),
        numpy_helper.from_array(rand(2), "conv_b"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(i64(0), "axes0"),
        numpy_helper.from_array(i64(-1), "minus1"),
        numpy_helper.from_array(rand(2 * 6 * 6, 3), "fc_w"),
        numpy_helper.from_array(rand(3), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["relu"], name="relu"),
        helper.make_node("Shape", ["relu"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"], name="unsqueeze"),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["relu", "target"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="fc_bias"),
    ]
    path = _save(_classifier(nodes, inits), tmp_path / "reshape.onnx")
    sim = SimModel(load_model(path))
    for batch in (1, 5):
        actual, expected = _sim_vs_ort(path, rand(batch, 1, 6, 6), sim)
        assert_same(actual, expected)


@pytest.mark.parametrize("name, shape", [("digits_cnn.onnx", (8, 1, 8, 8)), ("cifar10_cnn.onnx", (8, 3, 32, 32))])
def test_sample_model_float_matches_onnxruntime(name, shape):
    path = SAMPLE_MODELS / name
    x = np.random.default_rng(7).uniform(0, 1, size=shape).astype(np.float32)
    actual, expected = _sim_vs_ort(path, x)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert np.allclose(actual, expected, atol=1e-4), np.abs(actual - expected).max()
    assert (actual.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("op_type, attrs", [("LRN", dict(size=3)), ("Einsum", dict(equation="bchw->bchw"))])
def test_unsupported_op_is_a_clear_error(tmp_path, op_type, attrs):
    assert op_type not in OPS
    inits = [numpy_helper.from_array(rand(2, 1, 3, 3), "conv_w"), numpy_helper.from_array(rand(3, 32), "fc_w")]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv_out"], name="conv"),
        helper.make_node(op_type, ["conv_out"], ["mid"], name="unsupported", **attrs),
        helper.make_node("Flatten", ["mid"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc", transB=1),
    ]
    path = _save(_classifier(nodes, inits), tmp_path / f"{op_type}.onnx")
    with pytest.raises(PtqauditError, match=op_type):
        SimModel(load_model(path))


@pytest.mark.parametrize("case_id, op_type, x, opset, attrs", UPGRADED_OLD_OPSETS, ids=[c[0] for c in UPGRADED_OLD_OPSETS])
def test_old_opset_graph_is_upgraded_for_the_simulator(tmp_path, case_id, op_type, x, opset, attrs):
    """An op whose pre-13 version differs (2-D softmax coercion, attribute inputs) inside a classifier
    (op -> Flatten -> Gemm) at its old opset: the simulator converts the graph and matches ORT."""
    op_node = helper.make_node(op_type, ["input"], ["op_out"], name="op", **attrs)
    op_only = helper.make_model(helper.make_graph(
        [op_node], "op", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("op_out", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", opset)])
    op_shape = _session(op_only).run(None, {"input": x})[0].shape
    width = int(np.prod(op_shape[1:]))
    w = np.random.default_rng(0).standard_normal((width, 3)).astype(np.float32)
    nodes = [op_node, helper.make_node("Flatten", ["op_out"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "w", "c"], ["logits"], name="fc")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(3, np.float32), "c")]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [op_shape[0], 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    actual, expected = _sim_vs_ort(_save(model, tmp_path / "old.onnx"), x)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("shape", [(3, 16, 8, 8), (2, 4, 7, 7), (2, 5, 3, 5), (2, 3, 2, 1), (2, 3, 9), (4, 8, 32, 32)])
def test_global_average_pool_is_bitwise_onnxruntime(shape):
    """Sums of arbitrary float32 values round differently in another order; the simulator adds in MLAS's
    order, so its mean is ORT's to the last bit (a quantized graph's logits depend on it)."""
    x = np.random.default_rng(sum(shape)).uniform(0.0, 7.0, size=shape).astype(np.float32)
    model, node, feeds = single_node("GlobalAveragePool", [x], {}, 17)
    expected = _session(model).run(["out"], feeds)[0]
    np.testing.assert_array_equal(run_op(node, [x]).numpy(), expected)
    if shape == (4, 8, 32, 32):  # the order matters: torch's own mean misses ORT's value on this data
        assert not np.array_equal(torch.from_numpy(x).mean(dim=(2, 3), keepdim=True).numpy(), expected)
