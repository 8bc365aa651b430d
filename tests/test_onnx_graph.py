"""Tests for ptqaudit.onnx_graph: layer discovery, shapes, MACs and parameter counts on handcrafted
models, each checked against a computation written out here from the shapes alone."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_tiny_digits_model, make_model
from ptqaudit.errors import PtqauditError
from ptqaudit.onnx_graph import find_layers, load_model, read_model

OPSET = 17
RNG = np.random.default_rng(1234)


def init(name: str, shape) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32), name)


def vinfo(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "handmade", inputs, outputs, list(initializers))
    proto = make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto)
    return proto


def conv_out(size: int, kernel: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def layer_names(proto, input_shape):
    return [layer.name for layer in find_layers(proto, input_shape)]


# --- which nodes are quantizable ------------------------------------------------------------------------


def test_mixed_graph_keeps_only_constant_weight_layers_in_graph_order():
    """Conv/MatMul/Gemm with constant weights are layers; activation x activation products and Gemms
    the integer rewrite cannot express (alpha, beta != 1, transA) are not."""
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv_const", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c1"], ["f"], name="flatten"),  # [b, 4*8*8 = 256]
        helper.make_node("MatMul", ["f", "mm_w"], ["m1"], name="matmul_const"),  # [b, 32]
        helper.make_node("Transpose", ["m1"], ["m1t"], name="transpose"),  # [32, b]
        helper.make_node("MatMul", ["m1t", "m1"], ["gram"], name="matmul_two_activations"),  # [32, 32]
        helper.make_node("Gemm", ["m1", "g_w", "g_b"], ["g1"], name="gemm_plain"),  # [b, 16]
        helper.make_node("Gemm", ["g1", "ga_w"], ["g2"], name="gemm_alpha2", alpha=2.0),  # [b, 16]
        helper.make_node("Gemm", ["g2", "gb_w", "gb_b"], ["g3"], name="gemm_beta_half", beta=0.5),  # [b, 16]
        helper.make_node("Transpose", ["g3"], ["g3t"], name="transpose2"),  # [16, b]
        helper.make_node("Gemm", ["g3t", "gt_w"], ["g4"], name="gemm_transA", transA=1),  # [b, 16]
        helper.make_node("Gemm", ["g4", "gtb_w"], ["logits"], name="gemm_transB", transB=1),  # [b, 10]
        helper.make_node("ReduceSum", ["gram"], ["gram_sum"], name="gram_sum", keepdims=0),
    ]
    inits = [init("c1_w", (4, 1, 3, 3)), init("c1_b", (4,)), init("mm_w", (256, 32)), init("g_w", (32, 16)),
             init("g_b", (16,)), init("ga_w", (16, 16)), init("gb_w", (16, 16)), init("gb_b", (16,)),
             init("gt_w", (16, 16)), init("gtb_w", (10, 16))]
    proto = model(nodes, [vinfo("x", ["b", 1, 8, 8])], [vinfo("logits", ["b", 10]), vinfo("gram_sum", [])], inits)
    layers = find_layers(proto, ("b", 1, 8, 8))
    assert [l.name for l in layers] == ["conv_const", "matmul_const", "gemm_plain", "gemm_transB"]
    assert [l.op_type for l in layers] == ["Conv", "MatMul", "Gemm", "Gemm"]
    assert [l.index for l in layers] == [0, 1, 2, 3]
    assert [l.weight_name for l in layers] == ["c1_w", "mm_w", "g_w", "gtb_w"]
    by_name = {l.name: l for l in layers}
    # MACs per input: Conv = Cout*H*W * Cin*kh*kw; MatMul/Gemm = K*N (transB: B is [N, K])
    assert by_name["conv_const"].macs == 4 * 8 * 8 * 1 * 3 * 3
    assert by_name["matmul_const"].macs == 256 * 32
    assert by_name["gemm_plain"].macs == 32 * 16
    assert by_name["gemm_transB"].macs == 16 * 10
    # params: weight elements plus bias elements
    assert by_name["conv_const"].params == 4 * 1 * 3 * 3 + 4
    assert by_name["matmul_const"].params == 256 * 32
    assert by_name["gemm_plain"].params == 32 * 16 + 16
    assert by_name["gemm_transB"].params == 10 * 16
    assert by_name["conv_const"].output_shape == ("batch", 4, 8, 8)
    assert by_name["matmul_const"].output_shape == ("batch", 32)
    assert by_name["gemm_transB"].output_shape == ("batch", 10)
    assert by_name["gemm_transB"].weight_shape == (10, 16)
    # the axis a per-channel scale runs along
    assert by_name["conv_const"].output_channels == 4
    assert by_name["matmul_const"].output_channels == 32
    assert by_name["gemm_plain"].output_channels == 16
    assert by_name["gemm_transB"].output_channels == 10  # B stored [N, K] = [10, 16]: N, not K


@pytest.mark.parametrize("attrs", [{"alpha": 2.0}, {"beta": 0.5}, {"transA": 1}])
def test_gemm_with_non_plain_attributes_is_not_a_layer(attrs):
    a_shape = [16, "b"] if attrs.get("transA") else ["b", 16]
    nodes = [helper.make_node("Gemm", ["x", "w", "bias"], ["y"], name="gemm", **attrs)]
    proto = model(nodes, [vinfo("x", a_shape)], [vinfo("y", ["b", 10])], [init("w", (16, 10)), init("bias", (10,))])
    assert layer_names(proto, tuple(a_shape)) == []


@pytest.mark.parametrize("attrs", [{}, {"alpha": 1.0, "beta": 1.0, "transA": 0}, {"transB": 1}])
def test_plain_gemm_is_a_layer(attrs):
    weight_shape = (10, 16) if attrs.get("transB") else (16, 10)
    nodes = [helper.make_node("Gemm", ["x", "w", "bias"], ["y"], name="gemm", **attrs)]
    proto = model(nodes, [vinfo("x", ["b", 16])], [vinfo("y", ["b", 10])], [init("w", weight_shape), init("bias", (10,))])
    (layer,) = find_layers(proto, ("b", 16))
    assert (layer.name, layer.macs, layer.params, layer.output_shape) == ("gemm", 16 * 10, 16 * 10 + 10, ("batch", 10))
    assert layer.output_channels == 10  # N = the output width, whichever way B is stored


def test_matmul_of_two_activations_is_not_a_layer():
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="t"),
             helper.make_node("MatMul", ["x", "xt"], ["y"], name="mm")]
    proto = model(nodes, [vinfo("x", ["b", 16])], [vinfo("y", ["b", "b"])])
    assert layer_names(proto, ("b", 16)) == []


def test_matmul_with_non_2d_initializer_is_not_a_layer():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    proto = model(nodes, [vinfo("x", ["b", 3, 4, 16])], [vinfo("y", ["b", 3, 4, 10])], [init("w", (3, 16, 10))])
    assert layer_names(proto, ("b", 3, 4, 16)) == []


def test_matmul_on_sequence_input_counts_every_row():
    """x [b, T, K] @ W [K, N]: T*K*N MACs per input."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    proto = model(nodes, [vinfo("x", ["b", 5, 16])], [vinfo("y", ["b", 5, 10])], [init("w", (16, 10))])
    (layer,) = find_layers(proto, ("b", 5, 16))
    assert layer.macs == 5 * 16 * 10
    assert layer.output_shape == ("batch", 5, 10)
    assert layer.params == 160


def test_conv_whose_weight_is_a_graph_input_is_not_a_layer():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    proto = model(nodes, [vinfo("x", ["b", 1, 8, 8]), vinfo("w", [4, 1, 3, 3])], [vinfo("y", ["b", 4, 6, 6])])
    assert layer_names(proto, ("b", 1, 8, 8)) == []


@pytest.mark.parametrize(
    "cin, cout, group, kernel, stride, pad, dilation, size",
    [
        (3, 8, 1, 3, 1, 1, 1, 16),  # same padding
        (3, 8, 1, 3, 2, 1, 1, 16),  # stride 2
        (4, 6, 1, (3, 5), 1, 0, 1, 11),  # rectangular kernel, no padding, odd size
        (8, 8, 8, 3, 1, 1, 1, 10),  # depthwise
        (8, 4, 2, 1, 1, 0, 1, 7),  # grouped 1x1
        (2, 4, 1, 3, 1, 2, 2, 9),  # dilated
    ],
)
def test_conv_macs_params_and_output_shape(cin, cout, group, kernel, stride, pad, dilation, size):
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    ho, wo = conv_out(size, kh, stride, pad, dilation), conv_out(size, kw, stride, pad, dilation)
    nodes = [helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="/features/conv", group=group,
                              kernel_shape=[kh, kw], strides=[stride, stride], pads=[pad] * 4,
                              dilations=[dilation, dilation])]
    proto = model(nodes, [vinfo("x", ["N", cin, size, size])], [vinfo("y", ["N", cout, ho, wo])],
                  [init("w", (cout, cin // group, kh, kw)), init("bias", (cout,))])
    (layer,) = find_layers(proto, ("N", cin, size, size))
    assert layer.name == "/features/conv"
    assert layer.output_shape == ("batch", cout, ho, wo)
    assert layer.macs == cout * ho * wo * (cin // group) * kh * kw
    assert layer.params == cout * (cin // group) * kh * kw + cout
    assert layer.weight_shape == (cout, cin // group, kh, kw)


def _conv_behind_opaque_reshape(batch: str, weight_shape: tuple) -> onnx.ModelProto:
    """x [batch, 1, 8, 8] -> Reshape to its own shape, computed through float math (which defeats ONNX
    shape inference) -> Conv(weight_shape, pads 1) -> mean over H, W."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT, name="to_float"),
        helper.make_node("Sqrt", ["sf"], ["sq"], name="sqrt"),
        helper.make_node("Mul", ["sq", "sq"], ["sq2"], name="square"),
        helper.make_node("Round", ["sq2"], ["sr"], name="round"),
        helper.make_node("Cast", ["sr"], ["si"], to=TensorProto.INT64, name="to_int"),
        helper.make_node("Reshape", ["x", "si"], ["r"], name="reshape"),
        helper.make_node("Conv", ["r", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["y"], ["out"], axes=[2, 3], keepdims=0, name="gap"),
    ]
    return model(nodes, [vinfo("x", [batch, 1, 8, 8])], [vinfo("out", [batch, 4])], [init("w", weight_shape)], opset=13)


def test_output_shapes_fall_back_to_a_run_when_inference_cannot_tell():
    """A Reshape whose target shape goes through float math defeats ONNX shape inference; the Conv's
    output shape then comes from one ONNX Runtime run, and its MACs must still be right."""
    proto = _conv_behind_opaque_reshape("b", (4, 1, 3, 3))
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    y_info = [vi for vi in inferred.graph.value_info if vi.name == "y"]
    fully_known = bool(y_info) and y_info[0].type.tensor_type.HasField("shape") and all(
        d.HasField("dim_value") for d in y_info[0].type.tensor_type.shape.dim[1:])
    assert not fully_known  # otherwise this test would not exercise the fallback
    (layer,) = find_layers(proto, ("b", 1, 8, 8))
    assert layer.output_shape == ("batch", 4, 8, 8)
    assert layer.macs == 4 * 8 * 8 * 1 * 3 * 3


# --- symbolic input dims ----------------------------------------------------------------------------------


def symbolic_hw_model(tmp_path: Path) -> Path:
    """input [N, 3, H, W] -> Conv "conv" (3->4, 3x3, stride 2, pad 1) -> Relu -> GlobalAveragePool -> Flatten
    -> Gemm "fc" (4->10): runs on any H and W, but the Conv's MACs grow with them."""
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc"),
    ]
    proto = model(nodes, [vinfo("x", ["N", 3, "H", "W"])], [vinfo("logits", ["N", 10])],
                  [init("conv_w", (4, 3, 3, 3)), init("conv_b", (4,)), init("fc_w", (4, 10)), init("fc_b", (10,))])
    path = tmp_path / "symbolic_hw.onnx"
    onnx.save_model(proto, str(path))
    return path


@pytest.mark.parametrize("height, width", [(20, 12), (9, 9), (32, 32)])
def test_symbolic_height_and_width_come_from_the_given_input_shape(tmp_path, height, width):
    ho, wo = conv_out(height, 3, stride=2, pad=1), conv_out(width, 3, stride=2, pad=1)
    loaded = load_model(symbolic_hw_model(tmp_path), (3, height, width))
    conv, fc = loaded.layers
    assert conv.output_shape == ("batch", 4, ho, wo)
    assert conv.macs == 4 * ho * wo * 3 * 3 * 3
    assert (fc.output_shape, fc.macs) == (("batch", 10), 4 * 10)
    assert loaded.input_shape == ("N", 3, "H", "W")  # the model's own declaration is kept


def test_symbolic_input_without_a_shape_says_what_to_pass(tmp_path):
    with pytest.raises(PtqauditError, match=r"\[N, 3, H, W\] with symbolic H, W.*--input-shape 3,H,W"):
        load_model(symbolic_hw_model(tmp_path))


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 16), (3, 16, 16, 1)])
def test_an_input_shape_that_does_not_fit_the_model_is_refused(tmp_path, shape):
    with pytest.raises(PtqauditError, match=r"expects input \[N, 3, H, W\] but the data \(or --input-shape\) gives"):
        load_model(symbolic_hw_model(tmp_path), shape)


def test_the_input_shape_is_only_computed_when_the_model_needs_it(tmp_path, tiny_digits_model):
    calls = []

    def shape_from_data():
        calls.append(1)
        return (3, 10, 10)

    assert load_model(tiny_digits_model, shape_from_data).layers[0].macs == 4 * 8 * 8 * 9  # fixed [batch, 1, 8, 8]
    assert calls == []
    assert load_model(symbolic_hw_model(tmp_path), shape_from_data).layers[0].macs == 4 * 5 * 5 * 27
    assert calls == [1]


def test_a_model_onnx_runtime_cannot_run_is_a_clear_error(tmp_path):
    """A Conv whose weight wants 2 input channels where the input has 1 passes the ONNX checker.
    Behind a Reshape that defeats shape inference, its output shape takes an ORT run, which fails:
    one line saying so, not an internal error."""
    proto = _conv_behind_opaque_reshape("N", (4, 2, 3, 3))
    path = tmp_path / "mismatch.onnx"
    onnx.save_model(proto, str(path))
    with pytest.raises(PtqauditError, match=r"onnxruntime cannot run .*mismatch.onnx \(finding its layers' shapes\): .*conv"):
        load_model(path)


# --- naming ------------------------------------------------------------------------------------------------


def test_unnamed_conv_is_an_error():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    proto = model(nodes, [vinfo("x", ["b", 1, 8, 8])], [vinfo("y", ["b", 4, 8, 8])], [init("w", (4, 1, 3, 3))])
    with pytest.raises(PtqauditError, match="unnamed Conv"):
        find_layers(proto, ("b", 1, 8, 8))


def test_unnamed_non_quantizable_nodes_are_fine():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Conv", ["r", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    proto = model(nodes, [vinfo("x", ["b", 1, 8, 8])], [vinfo("y", ["b", 4, 8, 8])], [init("w", (4, 1, 3, 3))])
    assert layer_names(proto, ("b", 1, 8, 8)) == ["conv"]


def test_duplicate_layer_names_are_an_error():
    """Policies address layers by node name, so two layers sharing a name make every policy ambiguous.
    (ONNX Runtime itself refuses such a graph: 'two nodes with same node name'.)"""
    proto = build_tiny_digits_model("gemm")
    next(n for n in proto.graph.node if n.op_type == "Gemm").name = "conv"
    with pytest.raises(PtqauditError, match="conv"):
        find_layers(proto, ("batch", 1, 8, 8))


# --- load_model on the tiny classifiers ---------------------------------------------------------------------


@pytest.mark.parametrize("fixture, head_op", [("tiny_digits_model", "Gemm"), ("tiny_matmul_model", "MatMul")])
def test_load_model_describes_tiny_classifiers(request, fixture, head_op):
    path = request.getfixturevalue(fixture)
    loaded = load_model(path)
    assert loaded.input_name == "input"
    assert loaded.input_shape == ("batch", 1, 8, 8)
    assert loaded.num_classes == 10
    assert [(l.name, l.op_type) for l in loaded.layers] == [("conv", "Conv"), ("fc", head_op)]
    conv, fc = loaded.layers
    assert conv.macs == 4 * 8 * 8 * 1 * 3 * 3
    assert fc.macs == 256 * 10
    assert loaded.total_macs == conv.macs + fc.macs
    assert conv.params == 4 * 9 + 4
    assert fc.params == 2560 + (10 if head_op == "Gemm" else 0)  # the MatMul head's bias lives in an Add
    assert loaded.layer("fc") is fc


def test_read_model_errors_are_ptqaudit_errors(tmp_path, tiny_digits_model):
    with pytest.raises(PtqauditError, match="not found"):
        read_model(tmp_path / "absent.onnx")
    with pytest.raises(PtqauditError, match="not a file"):
        read_model(tmp_path)
    half = tmp_path / "half.onnx"
    data = Path(tiny_digits_model).read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(PtqauditError, match="not a readable ONNX model"):
        read_model(half)


def _with_external_location(proto: onnx.ModelProto, tensor_name: str, location: str, length: int) -> onnx.ModelProto:
    for tensor in proto.graph.initializer:
        if tensor.name == tensor_name:
            tensor.ClearField("raw_data")
            del tensor.float_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    return proto


def _assert_refused(path: Path, proto: onnx.ModelProto) -> None:
    """Reading the model saved at `path` is refused for external data that leaves its folder."""
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(PtqauditError, match="refusing.*outside"):
        read_model(path)


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "/etc/passwd"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    proto = _with_external_location(build_tiny_digits_model(), "fc_w", location, 256 * 10 * 4)
    _assert_refused(folder / "m.onnx", proto)


def test_external_data_symlink_leaving_the_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(2560, np.float32).tobytes())
    (folder / "weights.bin").symlink_to(secret)
    proto = _with_external_location(build_tiny_digits_model(), "fc_w", "weights.bin", 256 * 10 * 4)
    _assert_refused(folder / "m.onnx", proto)


def test_external_data_in_a_constant_attribute_is_checked_too(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    proto = build_tiny_digits_model()
    value = numpy_helper.from_array(np.zeros((1,), np.float32), "const_value")
    value.ClearField("raw_data")
    value.data_location = TensorProto.EXTERNAL
    for key, val in (("location", "../secret.bin"), ("offset", "0"), ("length", "4")):
        entry = value.external_data.add()
        entry.key, entry.value = key, val
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["unused_const"], name="const", value=value))
    _assert_refused(folder / "m.onnx", proto)


def test_external_data_in_the_same_folder_loads(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(build_tiny_digits_model(), str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    assert (folder / "weights.bin").is_file()
    loaded = load_model(path)
    assert [l.name for l in loaded.layers] == ["conv", "fc"]
    expected = build_tiny_digits_model()
    for tensor in loaded.proto.graph.initializer:
        reference = next(t for t in expected.graph.initializer if t.name == tensor.name)
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), numpy_helper.to_array(reference))
