"""The simulator's torch ops (ptqaudit.sim.ops.OPS) against ONNX Runtime, one tiny single-node model per
case, plus whole graphs run through SimModel with no policy (float) against ORT."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
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


def i32(*values) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def bools(*values) -> np.ndarray:
    return np.array(values, dtype=bool)


def normal(*shape, mean=0.0, std=1.0) -> np.ndarray:
    return _RNG.normal(mean, std, size=shape).astype(np.float32)


# --- running one node in ORT and through OPS ------------------------------------------------------


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def single_node(op_type: str, inputs, attrs: dict, opset: int, outputs: int = 1, domain: str = ""):
    """(model, node, feeds) for one node whose non-None inputs are graph inputs; None -> absent ("").
    Its outputs are "out" (one) or "out0", "out1", ...; a com.microsoft op also imports that domain."""
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
    out_names = ["out"] if outputs == 1 else [f"out{i}" for i in range(outputs)]
    node = helper.make_node(op_type, names, out_names, name="node", domain=domain or None, **attrs)
    graph = helper.make_graph([node], "single", graph_inputs, [onnx.ValueInfoProto(name=n) for n in out_names])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return make_model(graph, opset_imports=imports), node, feeds


def run_op(node: onnx.NodeProto, inputs) -> torch.Tensor:
    """The op's first output through OPS, as SimModel calls it: attributes(node), torch inputs (None when absent)."""
    return run_op_outputs(node, inputs)[0]


def run_op_outputs(node: onnx.NodeProto, inputs) -> tuple[torch.Tensor, ...]:
    args = [None if v is None else torch.from_numpy(np.array(v)) for v in inputs]
    while args and args[-1] is None:
        args.pop()
    out = OPS[node.op_type](attributes(node), *args)
    return out if isinstance(out, tuple) else (out,)


def assert_same(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5, atol: float = 1e-6):
    """Exact equality for integer and bool outputs; for floats close within rtol and atol, atol scaled by the
    output's largest magnitude when that is over 1 (summing in another order than ORT's kernels errs in
    proportion to the terms). Returns (max abs diff, bitwise equal?) for a float output, None otherwise."""
    assert actual.shape == expected.shape, f"shape {actual.shape} != ORT {expected.shape}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != ORT {expected.dtype}"
    if not np.issubdtype(expected.dtype, np.floating):
        np.testing.assert_array_equal(actual, expected)
        return None
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))  # incl. equal infinities
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(actual.astype(np.float64) - expected))
    max_diff = float(np.where(np.isnan(diff), np.inf, diff).max()) if actual.size else 0.0
    finite = np.abs(expected[np.isfinite(expected)])
    atol *= max(1.0, float(finite.max())) if finite.size else 1.0
    assert np.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True), (
        f"max abs diff {max_diff}\nsim={actual}\nort={expected}")
    return max_diff, bool(np.array_equal(actual, expected, equal_nan=True))


def check_op(op_type: str, inputs, attrs: dict | None = None, opset: int = 17, outputs: int = 1, domain: str = "",
             rtol: float = 1e-5, atol: float = 1e-6) -> list:
    """The node's outputs through OPS against ORT's; for each float output its (max abs diff, bitwise?)."""
    model, node, feeds = single_node(op_type, inputs, attrs or {}, opset, outputs, domain)
    expected = _session(model).run(None, feeds)
    actual = run_op_outputs(node, inputs)
    assert len(actual) >= len(expected), f"{len(actual)} outputs, ORT has {len(expected)}"
    stats = [assert_same(np.asarray(a.detach().numpy()), np.asarray(e), rtol, atol) for a, e in zip(actual, expected)]
    return [s for s in stats if s is not None]


# --- the cases: pytest.param(op_type, inputs, attrs, opset, outputs, domain, id=...) -----------------

def case(id, op, inputs, opset=17, marks=(), outputs=1, domain="", **attrs):
    """One single-node comparison; `outputs`: how many outputs the node names (all are compared)."""
    return pytest.param(op, inputs, attrs, opset, outputs, domain, id=id, marks=marks)


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

XC = grid(3, 4)
YC = XC.copy()
YC[0, :2] += 0.5  # some equal, some not
COMPARE_LOGIC = [
    *[case(f"{op.lower()}-{name}", op, inputs) for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")
      for name, inputs in [("float", [XC, YC]), ("float-broadcast", [XC, YC[1]]),
                           ("int64", [i64(1, -2, 3, 4), i64(1, 2, -3, 4)]),
                           ("int64-scalar", [i64(0, 1, 2, 3).reshape(2, 2), np.array(1, dtype=np.int64)]),
                           ("int32", [i32(5, -1, 0), i32(5, 0, -1)])]],
    case("equal-bool", "Equal", [bools(True, False, True), bools(True, True, False)]),
    case("not", "Not", [bools(True, False, True, False).reshape(2, 2)]),
    *[case(f"{op.lower()}-broadcast", op, [bools(True, False, True, False).reshape(2, 2), bools(True, False)])
      for op in ("And", "Or", "Xor")],
    case("where-float-broadcast", "Where", [rand(3, 1) > 0, rand(3, 4), rand(4)]),
    case("where-int64", "Where", [bools(True, False, True), i64(1, 2, 3), np.array(-1, dtype=np.int64)]),
    case("where-scalar-cond", "Where", [np.array(False), rand(2, 3), rand(2, 3)]),
    case("where-mask-fill", "Where", [bools(True, False, True, True).reshape(1, 1, 1, 4), f32(-np.inf), rand(2, 2, 3, 4)]),
    case("isnan", "IsNaN", [f32([0.0, np.nan, np.inf, -np.inf, -1.0])]),
    case("isinf", "IsInf", [f32([0.0, np.nan, np.inf, -np.inf, -1.0])]),
    case("isinf-positive-only", "IsInf", [f32([np.inf, -np.inf, 2.0])], detect_negative=0),
    case("isinf-negative-only", "IsInf", [f32([np.inf, -np.inf, 2.0])], detect_positive=0),
]

XT = rand(2, 3)
SHAPE_OPS = [
    case("expand-same-rank", "Expand", [rand(3, 1), i64(3, 4)]),
    case("expand-higher-rank", "Expand", [rand(3, 1), i64(2, 1, 6)]),
    case("expand-shape-smaller-rank", "Expand", [rand(2, 3, 4), i64(4)]),
    case("expand-shape-ones", "Expand", [rand(2, 1, 4), i64(1, 1, 1, 1)]),
    case("expand-int64", "Expand", [i64(1, 2, 3), i64(2, 1)]),
    case("expand-bool-mask", "Expand", [bools(True, False).reshape(1, 1, 1, 2), i64(3, 1, 2, 2)]),
    case("range-int64", "Range", [np.array(v, dtype=np.int64) for v in (0, 7, 2)]),
    case("range-int64-negative-delta", "Range", [np.array(v, dtype=np.int64) for v in (5, -4, -3)]),
    case("range-int64-empty", "Range", [np.array(v, dtype=np.int64) for v in (5, 1, 1)]),
    case("range-int32", "Range", [np.array(v, dtype=np.int32) for v in (2, 9, 3)]),
    case("range-float", "Range", [f32(0.1), f32(3.3), f32(0.1)]),
    case("range-float-negative", "Range", [f32(1.0), f32(-2.05), f32(-0.35)]),
    case("tile", "Tile", [XT, i64(2, 3)]),
    case("tile-ones", "Tile", [XT, i64(1, 1)]),
    case("tile-int64", "Tile", [i64(1, 2, 3), i64(2)]),
    case("split-input", "Split", [rand(2, 6), i64(1, 2, 3)], outputs=3, axis=1),
    case("split-equal", "Split", [rand(6, 2)], outputs=3),
    case("split-equal-negative-axis", "Split", [rand(2, 4, 3)], outputs=2, axis=-2),
    case("split-one-output", "Split", [rand(2, 4)], axis=1),
    case("split-opset18-num-outputs", "Split", [rand(2, 6)], opset=18, outputs=3, axis=1, num_outputs=3),
    case("split-opset18-uneven", "Split", [rand(7, 2)], opset=18, outputs=3, num_outputs=3),
    case("split-int64", "Split", [i64(1, 2, 3, 4, 5), i64(2, 3)], outputs=2),
]

XM = rand(2, 3, 4)
MATH = [
    case("cumsum-axis1", "CumSum", [XM, np.array(1, dtype=np.int64)]),
    case("cumsum-axis-negative-1d", "CumSum", [XM, i64(-1)]),
    case("cumsum-exclusive", "CumSum", [XM, np.array(2, dtype=np.int32)], exclusive=1),
    case("cumsum-reverse", "CumSum", [XM, np.array(0, dtype=np.int64)], reverse=1),
    case("cumsum-exclusive-reverse", "CumSum", [XM, np.array(1, dtype=np.int64)], exclusive=1, reverse=1),
    case("cumsum-long-float", "CumSum", [rand(3, 200), np.array(1, dtype=np.int64)]),
    case("cumsum-int64-mask", "CumSum", [i64(1, 1, 1, 0, 0, 1, 1, 0).reshape(2, 4), np.array(1, dtype=np.int64)]),
    case("cumsum-int32", "CumSum", [i32(3, -1, 4, 1, -5), np.array(0, dtype=np.int64)], exclusive=1, reverse=1),
    case("abs", "Abs", [XM]),
    case("abs-int64", "Abs", [i64(-3, 0, 4)]),
    case("sign", "Sign", [f32([-2.0, -0.0, 0.0, 0.5])]),
    case("sign-int64", "Sign", [i64(-3, 0, 4)]),
    case("reciprocal", "Reciprocal", [rand(3, 4, low=0.1, high=3.0)]),
    case("log", "Log", [rand(3, 4, low=1e-3, high=50.0)]),
    case("floor", "Floor", [rand(3, 4, low=-5, high=5)]),
    case("ceil", "Ceil", [rand(3, 4, low=-5, high=5)]),
    case("floor-ceil-edges", "Floor", [f32([-1.5, -1.0, -0.0, 0.0, 2.5, np.inf])]),
    case("mod-int64", "Mod", [i64(-7, 7, -7, 7, 6, 0), i64(3, 3, -3, -3, 4, 5)]),
    case("mod-int64-broadcast", "Mod", [i64(-9, 5, 17), np.array(4, dtype=np.int64)]),
    case("mod-int32-fmod", "Mod", [i32(-7, 7, -7, 7), i32(3, 3, -3, -3)], fmod=1),
    case("mod-float-fmod", "Mod", [f32([-7.5, 7.5, -7.5, 7.5]), f32([2.0, 2.0, -2.0, -2.0])], fmod=1),
    case("softplus", "Softplus", [rand(4, 5, low=-30, high=30)]),
    case("mish", "Mish", [rand(4, 5, low=-8, high=8)], opset=18),
    case("gelu-none", "Gelu", [rand(4, 5, low=-6, high=6)], opset=20),
    case("gelu-tanh", "Gelu", [rand(4, 5, low=-6, high=6)], opset=20, approximate="tanh"),
]

XRD = rand(2, 3, 4, low=0.5, high=1.5)
REDUCE_MORE = [
    *[case(f"{op.lower()}-{name}", op, [XRD], **attrs)
      for op in ("ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")
      for name, attrs in [("axis1-keep", dict(axes=[1])), ("axes-neg-nokeep", dict(axes=[-1, 0], keepdims=0)),
                          ("no-axes", {})]],
    case("reduceprod-int64", "ReduceProd", [i64(1, -2, 3, 4, 5, 6).reshape(2, 3)], axes=[1], keepdims=0),
    case("reducel2-opset18-axes-input", "ReduceL2", [XRD, i64(2)], opset=18),
    case("reducelogsumexp-large", "ReduceLogSumExp", [rand(2, 5, low=50, high=90)], axes=[1]),
    case("argmax-default", "ArgMax", [rand(3, 4)]),
    case("argmax-axis1-nokeep", "ArgMax", [rand(3, 4, 5)], axis=1, keepdims=0),
    case("argmin-axis-negative", "ArgMin", [rand(3, 4, 5)], axis=-1),
    case("argmax-ties-first", "ArgMax", [f32([[1, 3, 3, 0], [2, 2, 2, 2]])], axis=1),
    case("argmax-ties-last", "ArgMax", [f32([[1, 3, 3, 0], [2, 2, 2, 2]])], axis=1, select_last_index=1),
    case("argmin-ties-last", "ArgMin", [f32([[1, 0, 0, 3], [2, 2, 2, 2]])], axis=1, keepdims=0, select_last_index=1),
    case("argmax-int64", "ArgMax", [i64(3, 9, 9, 1).reshape(2, 2)], axis=0),
]

XG = rand(3, 4)
INDEXING = [
    case("einsum-matmul", "Einsum", [grid(3, 4), grid(4, 5)], equation="ij,jk->ik"),
    case("einsum-batched-attention", "Einsum", [grid(2, 3, 5, 4), grid(2, 3, 6, 4)], equation="bhqd,bhkd->bhqk"),
    case("einsum-transpose", "Einsum", [rand(2, 3, 4)], equation="abc->cab"),
    case("einsum-implicit-output", "Einsum", [grid(3, 4), grid(4, 5)], equation="ij,jk"),
    case("einsum-ellipsis", "Einsum", [grid(2, 3, 4), grid(2, 4, 5)], equation="...ij,...jk->...ik"),
    case("einsum-trace-sum", "Einsum", [grid(4, 4)], equation="ii->"),
    case("einsum-outer-spaces", "Einsum", [grid(3), grid(4)], equation="i, j -> ij"),
    case("einsum-int64", "Einsum", [i64(1, 2, 3, 4).reshape(2, 2), i64(5, 6, 7, 8).reshape(2, 2)],
         equation="ij,jk->ik"),
    case("trilu-upper", "Trilu", [rand(4, 5)]),
    case("trilu-lower", "Trilu", [rand(4, 5)], upper=0),
    case("trilu-upper-k", "Trilu", [rand(2, 4, 5), np.array(1, dtype=np.int64)]),
    case("trilu-lower-negative-k", "Trilu", [rand(2, 4, 5), np.array(-1, dtype=np.int64)], upper=0),
    case("trilu-causal-int64", "Trilu", [np.ones((4, 4), dtype=np.int64), np.array(1, dtype=np.int64)]),
    case("scatternd-rows", "ScatterND", [rand(4, 3), i64(2, 0).reshape(2, 1), rand(2, 3)]),
    case("scatternd-elements", "ScatterND", [rand(3, 4), i64(0, 1, 2, 3, 1, -1).reshape(3, 2), rand(3)]),
    case("scatternd-3d-slices", "ScatterND", [rand(2, 3, 4), i64(1, 2, 0, 0).reshape(2, 2), rand(2, 4)]),
    case("scatternd-batched-indices", "ScatterND", [rand(5, 2), i64(4, 0, 1, 3).reshape(2, 2, 1), rand(2, 2, 2)]),
    case("scatternd-int64", "ScatterND", [i64(1, 2, 3, 4), i64(3, 1).reshape(2, 1), i64(-1, -2)]),
    case("scatternd-add", "ScatterND", [rand(4, 3), i64(1, 1, 3).reshape(3, 1), rand(3, 3)], opset=18, reduction="add"),
    case("scatternd-mul", "ScatterND", [rand(4, 3), i64(1, 1, 3).reshape(3, 1), rand(3, 3)], opset=18, reduction="mul"),
    case("scatternd-max", "ScatterND", [rand(4, 3), i64(1, 1, 3).reshape(3, 1), rand(3, 3)], opset=18, reduction="max"),
    case("scatternd-min", "ScatterND", [rand(4, 3), i64(1, 1, 3).reshape(3, 1), rand(3, 3)], opset=18, reduction="min"),
    case("gatherelements-axis0", "GatherElements", [XG, i64(0, 2, 1, 0, -1, 0, 2, 1).reshape(2, 4)]),
    case("gatherelements-axis1", "GatherElements", [XG, i64(3, 0, -1, 1, 2, 2).reshape(3, 2)], axis=1),
    case("gatherelements-int32-indices", "GatherElements", [XG, i32(1, 0, 2).reshape(3, 1)], axis=-1),
    case("nonzero-float", "NonZero", [f32([[0, 1.5, 0], [2, 0, -1]])]),
    case("nonzero-bool-3d", "NonZero", [rand(2, 3, 4) > 0]),
    case("nonzero-int64-none", "NonZero", [np.zeros((2, 3), dtype=np.int64)]),
    case("onehot-default-axis", "OneHot", [i64(0, 2, -1, 5, 1), np.array(4, dtype=np.int64), f32([0.0, 1.0])]),
    case("onehot-axis0-float-indices", "OneHot", [f32([[0, 1], [2, -3]]), f32(3.0), f32([-1, 7])], axis=0),
    case("onehot-int64-values", "OneHot", [i64(2, 0, 3), np.array(3, dtype=np.int64), i64(0, 1)], axis=-1),
    case("onehot-axis1", "OneHot", [i32(1, -3, 0), np.array(3, dtype=np.int32), f32([0.5, 2.0])], axis=1),
    case("size", "Size", [rand(2, 3, 4)]),
    case("size-scalar", "Size", [np.array(3, dtype=np.int64)]),
]

LAYER_NORM = [
    case("layernorm-bert-hidden", "LayerNormalization", [normal(2, 7, 768), normal(768), normal(768)], outputs=3,
         epsilon=1e-12),
    case("layernorm-tail-5", "LayerNormalization", [normal(4, 37, mean=3.0, std=2.0), normal(37), normal(37)],
         outputs=3),
    case("layernorm-tail-4", "LayerNormalization", [normal(4, 3, 12), normal(12), normal(12)], outputs=3),
    case("layernorm-tail-3-no-bias", "LayerNormalization", [normal(6, 19), normal(19)], outputs=3),
    case("layernorm-exactly-8", "LayerNormalization", [normal(5, 8), normal(8), normal(8)], outputs=3),
    case("layernorm-short-row-welford", "LayerNormalization", [normal(6, 5, mean=10.0), normal(5), normal(5)],
         outputs=3),
    case("layernorm-row-of-1", "LayerNormalization", [normal(3, 1), normal(1), normal(1)], outputs=3),
    case("layernorm-axis1", "LayerNormalization", [normal(2, 3, 16), normal(3, 16), normal(3, 16)], outputs=3, axis=1),
    case("layernorm-axis-minus2", "LayerNormalization", [normal(2, 5, 4, 6), normal(4, 6)], outputs=3, axis=-2),
    case("layernorm-axis0", "LayerNormalization", [normal(3, 10), normal(3, 10), normal(3, 10)], outputs=3, axis=0),
    case("layernorm-large-offset", "LayerNormalization", [normal(4, 64, mean=1000.0, std=0.1), normal(64), normal(64)],
         outputs=3, epsilon=1e-6),
    case("layernorm-constant-rows", "LayerNormalization",
         [np.full((2, 32), 1234.0, np.float32), normal(32), normal(32)], outputs=3),
    case("layernorm-y-only", "LayerNormalization", [normal(3, 24), normal(24), normal(24)]),
    case("layernorm-double", "LayerNormalization", [normal(3, 20).astype(np.float64), normal(20).astype(np.float64),
                                                    normal(20).astype(np.float64)]),
]


def embed_inputs(hidden, batch=3, seq=7, vocab=30, mask=True, segments=True, position_ids=None):
    """EmbedLayerNormalization's inputs: int32 ids, a 0/1 int32 mask with some padding, random tables."""
    ids = _RNG.integers(0, vocab, (batch, seq)).astype(np.int32)
    segment_ids = _RNG.integers(0, 2, (batch, seq)).astype(np.int32) if segments else None
    padding = (np.arange(seq)[None, :] < np.array([seq, seq - 2, 1][:batch])[:, None]).astype(np.int32)
    return [ids, segment_ids, normal(vocab, hidden), normal(seq + 3, hidden), normal(2, hidden) if segments else None,
            normal(hidden), normal(hidden), padding if mask else None, position_ids]


MS = dict(domain="com.microsoft")
FUSED_NORM = [
    case("skiplayernorm-bert", "SkipLayerNormalization", [normal(2, 5, 768), normal(2, 5, 768), normal(768),
                                                          normal(768), normal(768)], outputs=4, **MS),
    case("skiplayernorm-no-bias", "SkipLayerNormalization", [normal(2, 5, 37), normal(2, 5, 37), normal(37),
                                                             normal(37)], outputs=4, epsilon=1e-5, **MS),
    case("skiplayernorm-no-beta-bias", "SkipLayerNormalization", [normal(2, 5, 12), normal(2, 5, 12), normal(12),
                                                                  None, normal(12)], outputs=4, **MS),
    case("skiplayernorm-skip-2d", "SkipLayerNormalization", [normal(2, 5, 16), normal(5, 16), normal(16),
                                                             normal(16)], outputs=4, **MS),
    case("skiplayernorm-skip-batch-1", "SkipLayerNormalization", [normal(3, 4, 9), normal(1, 4, 9), normal(9),
                                                                  normal(9), normal(9)], outputs=4, **MS),
    case("skiplayernorm-output-only", "SkipLayerNormalization", [normal(2, 3, 64, mean=5.0), normal(2, 3, 64),
                                                                 normal(64), normal(64)], **MS),
    case("embedlayernorm-bert", "EmbedLayerNormalization", embed_inputs(768), outputs=3, **MS),
    case("embedlayernorm-small-hidden", "EmbedLayerNormalization", embed_inputs(5), outputs=3, epsilon=1e-5, **MS),
    case("embedlayernorm-no-mask", "EmbedLayerNormalization", embed_inputs(24, mask=False), outputs=2, **MS),
    case("embedlayernorm-no-segment", "EmbedLayerNormalization", embed_inputs(24, segments=False), outputs=3, **MS),
    case("embedlayernorm-position-ids", "EmbedLayerNormalization",
         embed_inputs(16, position_ids=np.array([[4, 3, 2, 1, 0, 5, 6]], dtype=np.int32)), outputs=3, **MS),
    case("embedlayernorm-two-outputs", "EmbedLayerNormalization", embed_inputs(32, batch=2, seq=4), outputs=2, **MS),
]


def attention_inputs(batch=2, seq=5, hidden=16, sizes=None, bias=True, mask=None, past=0, heads=2, values=normal):
    """Attention's input, weights, bias (optional), mask_index (as given) and past (past > 0 steps)."""
    sizes = sizes or [hidden] * 3
    past_state = values(2, batch, heads, past, sizes[0] // heads) if past else None
    return [values(batch, seq, hidden), values(hidden, sum(sizes)) * 0.5, values(sum(sizes)) if bias else None, mask,
            past_state]


PADDED = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int32)
ATT = dict(domain="com.microsoft", num_heads=2)
CONTRIB = [
    case("fastgelu", "FastGelu", [rand(3, 8, low=-6, high=6)], domain="com.microsoft"),
    case("fastgelu-bias", "FastGelu", [rand(2, 3, 8, low=-6, high=6), rand(8)], domain="com.microsoft"),
    case("biasgelu", "BiasGelu", [rand(2, 3, 8, low=-6, high=6), rand(8)], domain="com.microsoft"),
    case("gelu-com-microsoft", "Gelu", [rand(3, 8, low=-6, high=6)], domain="com.microsoft"),
    case("quickgelu-default", "QuickGelu", [rand(3, 8, low=-8, high=8)], domain="com.microsoft"),
    case("quickgelu-alpha-1", "QuickGelu", [rand(3, 8, low=-8, high=8)], domain="com.microsoft", alpha=1.0),
    case("fusedmatmul", "FusedMatMul", [rand(3, 4), rand(4, 5)], domain="com.microsoft"),
    case("fusedmatmul-alpha-trans", "FusedMatMul", [grid(2, 4, 3), grid(2, 5, 4)], domain="com.microsoft", alpha=0.125,
         transA=1, transB=1),
    case("fusedmatmul-transb-broadcast", "FusedMatMul", [rand(2, 3, 4), rand(5, 4)], domain="com.microsoft", alpha=2.0,
         transB=1),
    case("attention-no-mask", "Attention", attention_inputs(), **ATT),
    case("attention-raw-mask-2d", "Attention", attention_inputs(mask=PADDED), **ATT),
    case("attention-key-lengths-1d", "Attention", attention_inputs(mask=np.array([5, 2], dtype=np.int32)), **ATT),
    case("attention-left-padding-2b", "Attention", attention_inputs(mask=np.array([5, 5, 0, 2], dtype=np.int32)),
         **ATT),
    case("attention-mask-3d", "Attention",
         attention_inputs(mask=(_RNG.uniform(size=(2, 5, 5)) > 0.3).astype(np.int32)), **ATT),
    case("attention-unidirectional", "Attention", attention_inputs(), unidirectional=1, **ATT),
    case("attention-unidirectional-raw-mask", "Attention", attention_inputs(mask=PADDED), unidirectional=1, **ATT),
    case("attention-mask-filter-value", "Attention", attention_inputs(mask=PADDED), mask_filter_value=-50.0, **ATT),
    case("attention-scale", "Attention", attention_inputs(mask=np.array([4, 3], dtype=np.int32)), scale=0.1, **ATT),
    case("attention-no-bias", "Attention", attention_inputs(bias=False, mask=PADDED), **ATT),
    case("attention-4-heads-bert-like", "Attention", attention_inputs(batch=3, seq=9, hidden=64, heads=4,
                                                                      mask=np.array([9, 4, 1], dtype=np.int32)),
         domain="com.microsoft", num_heads=4),
    case("attention-qkv-hidden-sizes", "Attention", attention_inputs(sizes=[16, 16, 8]), qkv_hidden_sizes=[16, 16, 8],
         **ATT),
    case("attention-past-present", "Attention", attention_inputs(past=3, mask=np.ones((2, 8), np.int32)), outputs=2,
         **ATT),
    case("attention-past-unidirectional", "Attention", attention_inputs(past=3), outputs=2, unidirectional=1, **ATT),
    case("attention-attention-bias", "Attention", attention_inputs(mask=PADDED) + [normal(1, 2, 5, 5)], **ATT),
    case("attention-grid-values", "Attention", attention_inputs(mask=PADDED, values=grid), **ATT),
]


def rnn_inputs(gates, seq=4, batch=3, directions=1, bias=True, lengths=None, initial=0, peepholes=False, layout=0):
    """LSTM (gates=4: X, W, R, B, sequence_lens, initial_h, initial_c, P) or GRU (gates=3: X, W, R, B,
    sequence_lens, initial_h) inputs, input size 5 and hidden size 6; `initial` initial states; weights
    small enough to keep the gates out of saturation."""
    hidden = 6
    x = normal(batch, seq, 5) if layout else normal(seq, batch, 5)
    state_shape = (batch, directions, hidden) if layout else (directions, batch, hidden)
    states = [normal(*state_shape) if i < initial else None for i in range(2 if gates == 4 else 1)]
    weights = [normal(directions, gates * hidden, 5, std=0.4), normal(directions, gates * hidden, hidden, std=0.4),
               normal(directions, 2 * gates * hidden, std=0.4) if bias else None]
    lens = None if lengths is None else np.array(lengths, dtype=np.int32)
    return [x, *weights, lens, *states] + ([normal(directions, 3 * hidden, std=0.4) if peepholes else None]
                                           if gates == 4 else [])


def rnn_case(id, op, outputs, **kwargs):
    """An LSTM/GRU case (hidden size 6): rnn_inputs' options among kwargs shape the inputs, the rest are
    attributes; a bidirectional direction gets weights for two directions."""
    options = {k: kwargs.pop(k) for k in ("seq", "batch", "bias", "lengths", "initial", "peepholes") if k in kwargs}
    directions = 2 if kwargs.get("direction") == "bidirectional" else 1
    inputs = rnn_inputs(4 if op == "LSTM" else 3, directions=directions, **options)
    return case(id, op, inputs, outputs=outputs, hidden_size=6, **kwargs)


RNN = [
    rnn_case("lstm-forward", "LSTM", 3),
    rnn_case("lstm-forward-y-only", "LSTM", 1),
    rnn_case("lstm-no-bias", "LSTM", 3, bias=False),
    rnn_case("lstm-reverse", "LSTM", 3, direction="reverse"),
    rnn_case("lstm-bidirectional", "LSTM", 3, direction="bidirectional"),
    rnn_case("lstm-initial-states", "LSTM", 3, initial=2),
    rnn_case("lstm-initial-h-only", "LSTM", 3, initial=1),
    rnn_case("lstm-sequence-lens", "LSTM", 3, lengths=[4, 2, 1]),
    rnn_case("lstm-sequence-len-zero", "LSTM", 3, lengths=[4, 0, 2], initial=2, direction="bidirectional"),
    rnn_case("lstm-sequence-lens-reverse", "LSTM", 3, lengths=[3, 4, 1], direction="reverse", initial=2),
    rnn_case("lstm-sequence-lens-bidirectional", "LSTM", 3, lengths=[2, 4, 3], direction="bidirectional", initial=2),
    rnn_case("lstm-peepholes", "LSTM", 3, peepholes=True, initial=2),
    rnn_case("lstm-input-forget", "LSTM", 3, input_forget=1, initial=2),
    rnn_case("lstm-clip", "LSTM", 3, clip=0.5, initial=2),
    rnn_case("lstm-explicit-activations", "LSTM", 3, activations=["Sigmoid", "Tanh", "Tanh"]),
    rnn_case("lstm-one-step-batch-1", "LSTM", 3, seq=1, batch=1),
    rnn_case("gru-forward", "GRU", 2),
    rnn_case("gru-linear-before-reset", "GRU", 2, linear_before_reset=1),
    rnn_case("gru-no-bias", "GRU", 2, bias=False, linear_before_reset=1),
    rnn_case("gru-reverse-initial", "GRU", 2, direction="reverse", initial=1),
    rnn_case("gru-bidirectional", "GRU", 2, direction="bidirectional", initial=1, linear_before_reset=1),
    rnn_case("gru-sequence-lens", "GRU", 2, lengths=[4, 1, 2], initial=1),
    rnn_case("gru-sequence-len-zero", "GRU", 2, lengths=[0, 4, 2], initial=1),
    rnn_case("gru-sequence-lens-bidirectional", "GRU", 2, lengths=[3, 4, 2], direction="bidirectional"),
    rnn_case("gru-clip", "GRU", 2, clip=0.3),
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

ALL_CASES = (CONV + POOL + GEMM + SLICE + PAD + SHAPES + REDUCE + ELEMENTWISE + COMPARE_LOGIC + SHAPE_OPS + MATH
             + REDUCE_MORE + INDEXING + LAYER_NORM + FUSED_NORM + CONTRIB + RNN + OLD_OPSETS)


@pytest.mark.parametrize("op_type, inputs, attrs, opset, outputs, domain", ALL_CASES)
def test_op_matches_onnxruntime(op_type, inputs, attrs, opset, outputs, domain, record_property):
    """Each float output's max abs diff from ORT and whether it is ORT's bit for bit go to the test report
    as the property float_outputs: [(max_abs_diff, bitwise), ...] (pytest --junitxml=report.xml
    -o junit_family=legacy)."""
    stats = check_op(op_type, inputs, attrs, opset, outputs, domain)
    if stats:
        record_property("float_outputs", stats)


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
    return make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


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


@pytest.mark.parametrize("op_type, attrs", [("LRN", dict(size=3)), ("Hardmax", dict(axis=1))])
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
    op_only = make_model(helper.make_graph(
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
    model = make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
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


@pytest.mark.parametrize("op_type, gates, attrs, lengths", [
    ("LSTM", 4, dict(direction="bidirectional"), [1, 4, 3]),
    ("LSTM", 4, dict(direction="reverse"), None),
    ("GRU", 3, dict(direction="bidirectional", linear_before_reset=1), [2, 4, 0]),
    ("GRU", 3, {}, [3, 1, 4]),
], ids=["lstm-bidirectional-lens", "lstm-reverse", "gru-bidirectional-lens", "gru-forward-lens"])
def test_rnn_layout1_is_batch_first_layout0(op_type, gates, attrs, lengths):
    """ORT's CPU RNNs reject layout=1, so compare with ORT running layout 0 on the transposed tensors:
    X [batch, seq, in] and states [batch, dirs, hidden] in, Y [batch, seq, dirs, hidden] out."""
    directions = 2 if attrs.get("direction") == "bidirectional" else 1
    states = 2 if op_type == "LSTM" else 1
    inputs = rnn_inputs(gates, directions=directions, lengths=lengths, initial=states, layout=1)
    batch_first = run_op_outputs(helper.make_node(op_type, [], [], hidden_size=6, layout=1, **attrs), inputs)
    seq_first = [inputs[0].transpose(1, 0, 2), *inputs[1:5]] + [s.transpose(1, 0, 2) for s in inputs[5:5 + states]]
    outputs = 1 + states
    model, _, feeds = single_node(op_type, seq_first, dict(hidden_size=6, **attrs), 17, outputs)
    expected = _session(model).run(None, feeds)
    assert_same(batch_first[0].numpy(), expected[0].transpose(2, 0, 1, 3))
    for actual, ort_state in zip(batch_first[1:], expected[1:]):
        assert_same(actual.numpy(), ort_state.transpose(1, 0, 2))


def test_split_without_sizes_splits_into_its_outputs():
    """Opset 13-17 Split with no `split` input makes as many equal parts as the node has outputs:
    attributes() hands that count to the handler."""
    node = helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1)
    assert attributes(node)["num_outputs"] == 3
    parts = OPS["Split"](attributes(node), torch.arange(12.0).reshape(2, 6))
    assert [p.shape for p in parts] == [(2, 2)] * 3
    node = helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1)
    parts = OPS["Split"](attributes(node), torch.arange(12.0).reshape(2, 6), torch.tensor([1, 5]))
    assert [p.shape for p in parts] == [(2, 1), (2, 5)]


@pytest.mark.parametrize("op_type, inputs, attrs", [
    ("LayerNormalization", [normal(2, 3, 20), normal(20), normal(20)], {}),
    ("LayerNormalization", [normal(4, 5), normal(5), normal(5)], {}),
    ("SkipLayerNormalization", [normal(2, 3, 12), normal(2, 3, 12), normal(12), normal(12), normal(12)], {}),
    ("EmbedLayerNormalization", embed_inputs(12), {}),
    ("Attention", attention_inputs(mask=np.array([7, 4], dtype=np.int32), past=2), dict(num_heads=2, unidirectional=1)),
    ("LSTM", rnn_inputs(4, directions=2, lengths=[4, 2, 3], initial=2, peepholes=True),
     dict(hidden_size=6, direction="bidirectional")),
    ("GRU", rnn_inputs(3, lengths=[4, 2, 3], initial=1), dict(hidden_size=6, linear_before_reset=1)),
    ("CumSum", [normal(3, 4), np.array(1, dtype=np.int64)], dict(exclusive=1)),
    ("FastGelu", [normal(3, 4), normal(4)], {}),
    ("BiasGelu", [normal(3, 4), normal(4)], {}),
    ("Gelu", [normal(3, 4)], dict(approximate="tanh")),
    ("Softplus", [normal(3, 4, std=30.0)], {}),
    ("ScatterND", [normal(4, 3), i64(2, 0).reshape(2, 1), normal(2, 3)], {}),
    ("Where", [rand(3, 4) > 0, normal(3, 4), normal(4)], {}),
], ids=lambda v: v if isinstance(v, str) else None)
def test_float_ops_are_differentiable(op_type, inputs, attrs):
    """The simulator trains through these: every float input gets a finite gradient from every output."""
    tensors = [None if v is None else torch.from_numpy(np.array(v)) for v in inputs]
    leaves = [t.requires_grad_() for t in tensors if t is not None and t.is_floating_point()]
    outputs = OPS[op_type](attrs, *tensors)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    sum(o.double().sum() for o in outputs if o.is_floating_point()).backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("op_type, attrs, reference", [
    ("LayerNormalization", dict(epsilon=1e-5), lambda x, g, b: F.layer_norm(x, (x.shape[-1],), g, b, 1e-5)),
    ("SkipLayerNormalization", dict(epsilon=1e-5), lambda x, g, b: F.layer_norm(2 * x, (x.shape[-1],), g, b, 1e-5)),
    ("CumSum", dict(exclusive=1), lambda x, g, b: torch.cumsum(x, 1) - x),
])
@pytest.mark.parametrize("hidden", [5, 48])
def test_ort_order_ops_keep_their_values_and_torchs_gradient(op_type, attrs, reference, hidden):
    """Ops that reproduce ORT's rounding element by element give the same values with autograd on, and
    back-propagate as the plain torch op does (not through the emulation loops)."""
    rng = np.random.default_rng(hidden)
    x, gamma, beta = (torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for shape in
                      [(3, 4, hidden), (hidden,), (hidden,)])
    args = {"LayerNormalization": lambda x, g, b: (x, g, b), "SkipLayerNormalization": lambda x, g, b: (x, x, g, b),
            "CumSum": lambda x, g, b: (x, torch.tensor(1))}[op_type]
    with torch.no_grad():
        plain = OPS[op_type](attrs, *args(x, gamma, beta))
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    out = OPS[op_type](attrs, *args(*leaves))
    plain, out = (v[0] if isinstance(v, tuple) else v for v in (plain, out))
    assert torch.equal(out.detach(), plain)
    weights = torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32))
    (out * weights).sum().backward()
    expected_leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    (reference(*expected_leaves) * weights).sum().backward()
    for leaf, expected in zip(leaves, expected_leaves):
        if expected.grad is not None:
            torch.testing.assert_close(leaf.grad, expected.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="reproduces ORT's x86-64 kernels")
@pytest.mark.parametrize("hidden", [1, 2, 5, 7, 8, 9, 12, 15, 16, 20, 31, 64, 100, 384, 768, 1023])
def test_layer_norms_are_bitwise_onnxruntime(hidden):
    """LayerNormalization, SkipLayerNormalization and EmbedLayerNormalization each follow their ORT kernel's
    order (MLAS's AVX2 kernel / scalar Welford / two-pass sums), so all their outputs are ORT's bit for bit
    (a quantized graph's activations depend on it)."""
    rng = np.random.default_rng(hidden)

    def values(*shape, offset=0.0):
        return (rng.standard_normal(shape) * rng.uniform(0.1, 5.0) + offset).astype(np.float32)

    x, gamma, beta = values(3, 11, hidden, offset=2.0), values(hidden), values(hidden)
    cases = [("LayerNormalization", [x, gamma, beta], 3, "", dict(epsilon=1e-12)),
             ("LayerNormalization", [x, gamma], 3, "", {}),
             ("SkipLayerNormalization", [x, values(3, 11, hidden), gamma, beta, values(hidden)], 4, "com.microsoft",
              {}),
             ("EmbedLayerNormalization", embed_inputs(hidden), 3, "com.microsoft", {})]
    for op_type, inputs, outputs, domain, attrs in cases:
        model, node, feeds = single_node(op_type, inputs, attrs, 17, outputs, domain)
        for actual, expected in zip(run_op_outputs(node, inputs), _session(model).run(None, feeds)):
            np.testing.assert_array_equal(actual.numpy(), expected, err_msg=op_type)
