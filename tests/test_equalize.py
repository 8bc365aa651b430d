"""Cross-layer equalization: which layers pair up, and that the rescaled network computes what the teacher does (ORT)."""

import numpy as np
import onnx
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

from ptqaudit.distill import export_student
from ptqaudit.equalize import equalizable_pairs, equalize, range_spread
from ptqaudit.evaluate import make_session
from ptqaudit.onnx_graph import load_model
from ptqaudit.sim.model import SimModel

SAMPLES = ["sample_models/cifar10_cnn.onnx", "sample_models/digits_cnn.onnx"]


def _weight(rng, shape, channel_axis):
    """Random weights whose channels along channel_axis differ in scale by up to 100x, as folded batch norms leave them."""
    scales = 10.0 ** rng.uniform(-1, 1, size=shape[channel_axis])
    view = [1] * len(shape)
    view[channel_axis] = -1
    return (rng.normal(0, 0.3, size=shape) * scales.reshape(view)).astype(np.float32)


def build_chain(middle: str, seed: int = 0) -> onnx.ModelProto:
    """input [b,3,6,6] -> Conv "a" (3->4) -> middle -> Conv "b" (4->4) -> GlobalAveragePool -> Flatten -> Gemm "c"
    (transB) -> Relu -> Gemm "d" (transB) -> logits [b,3]. middle: relu, pool (Relu, MaxPool), sigmoid, branch (Relu,
    whose output b's output is also added to), group (Relu, and b in two groups)."""
    rng = np.random.default_rng(seed)
    groups = 2 if middle == "group" else 1
    inits = {"wa": _weight(rng, (4, 3, 3, 3), 0), "ba": rng.normal(0, 0.1, 4).astype(np.float32),
             "wb": _weight(rng, (4, 4 // groups, 3, 3), 1), "bb": rng.normal(0, 0.1, 4).astype(np.float32),
             "wc": _weight(rng, (5, 4), 0), "bc": rng.normal(0, 0.1, 5).astype(np.float32),
             "wd": _weight(rng, (3, 5), 1), "bd": rng.normal(0, 0.1, 3).astype(np.float32)}
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["input", "wa", "ba"], ["a_out"], name="a", **conv)]
    into_b = "mid"
    if middle == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["a_out"], ["mid"], name="act"))
    else:
        nodes.append(helper.make_node("Relu", ["a_out"], ["relu_out" if middle == "pool" else "mid"], name="act"))
    if middle == "pool":
        nodes.append(helper.make_node("MaxPool", ["relu_out"], ["mid"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("Conv", [into_b, "wb", "bb"], ["b_out"], name="b", group=groups, **conv))
    tail = "b_out"
    if middle == "branch":
        nodes.append(helper.make_node("Add", ["b_out", "mid"], ["sum"], name="residual"))
        tail = "sum"
    nodes += [helper.make_node("GlobalAveragePool", [tail], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
              helper.make_node("Gemm", ["flat", "wc", "bc"], ["c_out"], name="c", transB=1),
              helper.make_node("Relu", ["c_out"], ["c_relu"], name="c_act"),
              helper.make_node("Gemm", ["c_relu", "wd", "bd"], ["logits"], name="d", transB=1)]
    graph = helper.make_graph(nodes, f"chain_{middle}",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
                              [numpy_helper.from_array(value, name) for name, value in inits.items()])
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _load(tmp_path, proto: onnx.ModelProto):
    path = tmp_path / f"{proto.graph.name}.onnx"
    onnx.save(proto, str(path))
    return load_model(path)


@pytest.mark.parametrize("middle, expected", [
    ("relu", [("a", "b"), ("c", "d")]),
    ("pool", [("a", "b"), ("c", "d")]),  # max pooling commutes with a positive scale too
    ("sigmoid", [("c", "d")]),  # sigmoid(x / s) is not sigmoid(x) / s
    ("branch", [("c", "d")]),  # a's scaled output would also reach the residual sum
    ("group", [("c", "d")]),  # b's input channels are split over groups
])
def test_pairs_are_the_layers_joined_only_by_operations_a_positive_scale_passes(tmp_path, middle, expected):
    model = _load(tmp_path, build_chain(middle))
    assert equalizable_pairs(model, SimModel(model)) == expected


def _ort_logits(proto: onnx.ModelProto, model, count: int = 16) -> np.ndarray:
    shape = [count] + [d if isinstance(d, int) else 1 for d in model.input_shape[1:]]
    x = np.random.default_rng(1).random(shape).astype(np.float32)
    return make_session(proto).run(None, {model.input_name: x})[0]


@pytest.mark.parametrize("source", SAMPLES + ["pool", "relu"])
def test_equalized_network_computes_the_teachers_function_on_ort(tmp_path, source):
    model = load_model(source) if source.endswith(".onnx") else _load(tmp_path, build_chain(source))
    sim = SimModel(model)
    pairs = equalizable_pairs(model, sim)
    assert pairs
    before = range_spread(sim, [name for pair in pairs for name in pair])
    equalize(sim, pairs)
    student = export_student(model, sim)
    teacher_logits, student_logits = _ort_logits(model.proto, model), _ort_logits(student, model)
    assert np.allclose(student_logits, teacher_logits, rtol=1e-4, atol=1e-4 * np.abs(teacher_logits).max())
    # and the weights did change: the layers' channel ranges moved toward their per-tensor range
    assert range_spread(sim, [name for pair in pairs for name in pair]) != before


@pytest.mark.parametrize("source", SAMPLES + ["relu"])
def test_paired_channels_end_with_equal_weight_ranges(tmp_path, source):
    """Read back from the exported ONNX in NumPy: output channel i of A and input channel i of B span the same
    range (what s_i = sqrt(r_A,i / r_B,i) is for), also where a layer sits in two pairs once the sweeps settle."""
    model = load_model(source) if source.endswith(".onnx") else _load(tmp_path, build_chain(source))
    sim = SimModel(model)
    pairs = equalizable_pairs(model, sim)
    equalize(sim, pairs)
    student = export_student(model, sim)
    weights = {init.name: numpy_helper.to_array(init) for init in student.graph.initializer}
    nodes = {node.name: node for node in student.graph.node}

    def engine(name):  # the weight as the layer multiplies by it: Conv [Cout, Cin, ...], Gemm/MatMul [K, N]
        node = nodes[name]
        weight = np.abs(weights[node.input[1]].astype(np.float64))
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        return weight.T if transposed else weight

    for first, second in pairs:
        a, b = engine(first), engine(second)
        if nodes[first].op_type == "Conv":
            out_ranges = a.reshape(a.shape[0], -1).max(axis=1)
        else:
            out_ranges = a.max(axis=0)
        in_ranges = b.transpose(1, 0, *range(2, b.ndim)).reshape(b.shape[1], -1).max(axis=1) \
            if nodes[second].op_type == "Conv" else b.max(axis=1)
        assert np.allclose(out_ranges, in_ranges, rtol=1e-3)
