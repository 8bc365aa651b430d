"""Checks ptqaudit.quantize against the NumPy reference (integer codes bit for bit) and against ORT's quantize_dynamic."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

from ptqaudit.arithmetic import quantize_weight, weight_code_limit
from ptqaudit.onnx_graph import load_model, with_outputs
from ptqaudit.policy import ResolvedPolicy, load_policy, parse_policy
from ptqaudit.quantize import ORT_QUANTIZER, REWRITE, quantize

import numpy_reference as ref
from reference_cases import CONV_CASES, conv_kwargs, ort_quantize_dynamic

F32 = np.float32
OPSET = 17
FLOAT_OPS = ("Conv", "MatMul", "Gemm")
INTEGER_OPS = ("ConvInteger", "MatMulInteger")
TENSOR_KEYS = ("x_codes", "x_scale", "x_zero_point", "w_codes", "w_scale", "acc", "output")
BITS = [(8, 8), (4, 8), (4, 4), (2, 8), (3, 5), (7, 8), (8, 3), (5, 2)]


# ---------------------------------------------------------------- helpers


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _save_model(tmp_path, nodes, inits, x_shape, *, opset=OPSET, filename="model.onnx", extra_inputs=()):
    """Save a one-input, one-output ([batch, classes]-style) model and load it with ptqaudit."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *x_shape[1:]]), *extra_inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "classes"])],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / filename
    onnx.save(model, str(path))
    return load_model(path)


def _resolve(model, default, rules=None, name="test") -> ResolvedPolicy:
    data = {"default": default}
    if rules:
        data["layers"] = rules
    return parse_policy(data, name, "test").resolve(model.layers)


def _uniform(model, bits_w, bits_a, per_channel=False) -> ResolvedPolicy:
    return _resolve(
        model,
        {"weight_bits": bits_w, "activation_bits": bits_a, "granularity": "per-channel" if per_channel else "per-tensor"},
    )


def _session(proto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(proto, x, extra=(), level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> dict:
    """Runs a model on x, exposing the named intermediate tensors as extra graph outputs."""
    session = _session(with_outputs(proto, extra), level)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: x})))


def _run_y(proto, x) -> np.ndarray:
    session = _session(proto)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _initializers(proto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _assert_bitwise(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.tobytes() != expected.tobytes():
        bad = np.flatnonzero(actual.ravel() != expected.ravel())
        pytest.fail(
            f"{what}: {bad.size} of {actual.size} elements differ, first at flat {bad[:5]}: "
            f"{actual.ravel()[bad[:5]]} != {expected.ravel()[bad[:5]]}"
        )


def _assert_close(actual, expected, what, rtol=1e-6):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    atol = 1e-6 * max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def _x(rng, shape, kind="mixed"):
    """Random inputs with negatives and one outlier (its range is shared by the whole batch)."""
    x = (rng.standard_normal(shape) * 1.5 - 0.2).astype(F32)
    if kind == "mixed":
        x.flat[rng.integers(x.size)] = F32(6.25)
    elif kind == "negative":
        x = -np.abs(x) - F32(0.01)
    elif kind == "positive":
        x = np.abs(x) + F32(0.01)
    elif kind == "zero":
        x = np.zeros(shape, F32)
    return x


def _check_layer_against_reference(quantized, layer_name, x, r, *, conv_per_channel=False):
    """Reads the layer's tensors back from ORT and compares them with the reference's dict `r`."""
    names = quantized.layer_tensors[layer_name]
    assert set(names) >= set(TENSOR_KEYS), f"layer_tensors[{layer_name}] lacks {set(TENSOR_KEYS) - set(names)}"
    inits = _initializers(quantized.proto)
    runtime = [names[k] for k in ("x_codes", "x_scale", "x_zero_point", "acc", "output")]
    got = _run(quantized.proto, x, runtime)
    got_w = {k: inits[names[k]] if names[k] in inits else _run(quantized.proto, x, [names[k]])[names[k]]
             for k in ("w_codes", "w_scale")}
    _assert_bitwise(got[names["x_codes"]], r["x_codes"], "activation codes")
    _assert_bitwise(got[names["x_scale"]], np.asarray(r["x_scale"]), "activation scale")
    _assert_bitwise(got[names["x_zero_point"]], np.asarray(r["x_zp"]), "activation zero point")
    _assert_bitwise(got_w["w_codes"], r["w_codes"], "weight codes")
    w_scale = got_w["w_scale"]
    if conv_per_channel:  # laid out [M, 1, 1] to broadcast over NCHW; the values are the reference's [M]
        assert w_scale.shape == r["w_scale"].shape + (1, 1), f"per-channel Conv weight scale shape {w_scale.shape}"
        w_scale = w_scale.reshape(-1)
    _assert_bitwise(w_scale, r["w_scale"], "weight scale")
    _assert_bitwise(got[names["acc"]], r["acc"], "int32 accumulator")
    _assert_close(got[names["output"]], r["y"], "layer output")


# ---------------------------------------------------------------- public weight helpers


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_code_limit(bits):
    assert weight_code_limit(bits) == ref.weight_qmax(bits)
    assert weight_code_limit(7) == 64  # ORT's reduce_range grid: codes -64..64


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape,axis", [((6, 3, 3, 3), 0), ((12, 5), 1), ((7, 4), None), ((4, 2, 1, 1), None)])
def test_quantize_weight_matches_reference(bits, shape, axis):
    rng = np.random.default_rng(_seed(bits, shape, axis))
    w = (rng.standard_normal(shape) * rng.uniform(0.001, 3.0)).astype(F32)
    if axis is not None:
        w = np.moveaxis(w, axis, 0)
        w[1] = 0.0  # an all-zero channel: scale 1, codes 0
        w[2] *= 1e-3
        w = np.moveaxis(w, 0, axis)
    codes, scales = quantize_weight(w, bits, axis)
    r_codes, r_scales = ref.quantize_weight(w, bits, axis is not None, 0 if axis is None else axis)
    _assert_bitwise(codes, r_codes, "weight codes")
    _assert_bitwise(np.asarray(scales), r_scales, "weight scales")
    limit = ref.weight_qmax(bits)
    assert codes.min() >= -limit and codes.max() <= limit
    assert np.abs(codes).max() == limit  # the largest |w| lands on the largest code


def test_quantize_weight_all_zero():
    codes, scale = quantize_weight(np.zeros((3, 4), F32), 4, None)
    assert not codes.any() and float(scale) == 1.0


# ---------------------------------------------------------------- rewrite path, one layer at a time

@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("quantize")


def _conv_model(tmp_path, case):
    spec = CONV_CASES[case]
    rng = np.random.default_rng(_seed("conv", case))
    w = (rng.standard_normal(spec["w"]) * rng.uniform(0.05, 1.0, (spec["w"][0], 1, 1, 1))).astype(F32)
    w[-1] *= 0.01  # a channel much smaller than the rest: per-channel scales differ a lot
    b = rng.standard_normal(spec["w"][0]).astype(F32) if spec["bias"] else None
    inits = {"W": w} | ({"B": b} if b is not None else {})
    nodes = [
        helper.make_node("Conv", ["x", "W"] + (["B"] if b is not None else []), ["conv_out"], name="conv", **spec["attrs"]),
        helper.make_node("Flatten", ["conv_out"], ["y"], name="flatten"),
    ]
    return _save_model(tmp_path, nodes, inits, spec["x"], filename=f"conv_{case}.onnx"), w, b


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("bits", BITS, ids=[f"w{w}a{a}" for w, a in BITS])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_rewrite_matches_reference(case, bits, per_channel, module_tmp):
    spec = CONV_CASES[case]
    model, w, b = _conv_model(module_tmp, case)
    bits_w, bits_a = bits
    quantized = quantize(model, _uniform(model, bits_w, bits_a, per_channel), force_rewrite=True)
    assert quantized.method == REWRITE
    assert not [n for n in quantized.proto.graph.node if n.op_type in FLOAT_OPS]
    rng = np.random.default_rng(_seed("x", case, bits, per_channel))
    x = _x(rng, spec["x"])
    r = ref.conv_layer(x, w, b, bits_w, bits_a, per_channel, **conv_kwargs(spec["attrs"]))
    _check_layer_against_reference(quantized, "conv", x, r, conv_per_channel=per_channel)


def _matmul_model(tmp_path, x_shape, k, n, filename="matmul.onnx"):
    rng = np.random.default_rng(_seed("matmul", x_shape, k, n))
    w = (rng.standard_normal((k, n)) * rng.uniform(0.02, 1.0, (1, n))).astype(F32)
    b = rng.standard_normal(n).astype(F32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm_out"], name="mm"),
        helper.make_node("Add", ["mm_out", "B"], ["add_out"], name="bias_add"),
    ]
    if len(x_shape) > 2:
        nodes.append(helper.make_node("Flatten", ["add_out"], ["y"], name="flatten"))
    else:
        nodes.append(helper.make_node("Identity", ["add_out"], ["y"], name="identity"))
    return _save_model(tmp_path, nodes, {"W": w, "B": b}, x_shape, filename=filename), w, b


@pytest.mark.parametrize("x_shape", [(5, 12), (3, 4, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("bits", BITS, ids=[f"w{w}a{a}" for w, a in BITS])
def test_matmul_rewrite_matches_reference(bits, per_channel, x_shape, module_tmp, ort_kernel_family):
    model, w, b = _matmul_model(module_tmp, x_shape, 12, 7, filename=f"matmul_{len(x_shape)}d.onnx")
    bits_w, bits_a = bits
    quantized = quantize(model, _uniform(model, bits_w, bits_a, per_channel), force_rewrite=True)
    assert quantized.method == REWRITE
    rng = np.random.default_rng(_seed("x", "matmul", bits, per_channel, x_shape))
    x = _x(rng, x_shape)
    # the bias is the separate Add node, kept float
    r = ref.matmul_layer(x, w, None, bits_w, bits_a, per_channel, ort_kernel_family)
    _check_layer_against_reference(quantized, "mm", x, r)
    y = _run_y(quantized.proto, x)
    _assert_close(y, (r["y"] + b).reshape(x_shape[0], -1), "model output (MatMul + Add)")


GEMM_CASES = {
    "transB1_C": dict(trans_b=1, c="vector"),
    "transB0_C": dict(trans_b=0, c="vector"),
    "transB1_C_row": dict(trans_b=1, c="row"),
    "transB0_noC": dict(trans_b=0, c=None),
}


def _gemm_model(tmp_path, case, k=10, n=6):
    spec = GEMM_CASES[case]
    rng = np.random.default_rng(_seed("gemm", case))
    w = (rng.standard_normal((k, n)) * rng.uniform(0.02, 1.0, (1, n))).astype(F32)
    stored = np.ascontiguousarray(w.T) if spec["trans_b"] else w
    inits = {"B": stored}
    inputs = ["x", "B"]
    c = None
    if spec["c"] is not None:
        c = rng.standard_normal(n if spec["c"] == "vector" else (1, n)).astype(F32)
        inits["C"] = c
        inputs.append("C")
    attrs = {"transB": 1} if spec["trans_b"] else {}
    nodes = [helper.make_node("Gemm", inputs, ["y"], name="gemm", **attrs)]
    return _save_model(tmp_path, nodes, inits, (4, k), filename=f"gemm_{case}.onnx"), stored, c


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("bits", BITS, ids=[f"w{w}a{a}" for w, a in BITS])
@pytest.mark.parametrize("case", sorted(GEMM_CASES))
def test_gemm_rewrite_matches_reference(case, bits, per_channel, module_tmp, ort_kernel_family):
    model, stored, c = _gemm_model(module_tmp, case)
    bits_w, bits_a = bits
    quantized = quantize(model, _uniform(model, bits_w, bits_a, per_channel), force_rewrite=True)
    assert quantized.method == REWRITE
    assert not [n for n in quantized.proto.graph.node if n.op_type in FLOAT_OPS]
    rng = np.random.default_rng(_seed("x", "gemm", case, bits, per_channel))
    x = _x(rng, (4, 10))
    r = ref.gemm_layer(x, stored, c, bits_w, bits_a, per_channel, trans_b=bool(GEMM_CASES[case]["trans_b"]),
                       family=ort_kernel_family)
    _check_layer_against_reference(quantized, "gemm", x, r)


@pytest.mark.parametrize("kind", ["negative", "positive", "zero", "mixed"])
@pytest.mark.parametrize("bits_a", [8, 5, 2])
def test_activation_edge_cases(kind, bits_a, module_tmp):
    """All-negative (zp = 2^b-1), all-positive (zp = 0), all-zero (scale 1, codes 0) inputs."""
    model, w, _ = _matmul_model(module_tmp, (5, 12), 12, 7, filename="matmul_2d.onnx")
    quantized = quantize(model, _uniform(model, 4, bits_a), force_rewrite=True)
    x = _x(np.random.default_rng(_seed(kind, bits_a)), (5, 12), kind)
    r = ref.matmul_layer(x, w, None, 4, bits_a, False)
    _check_layer_against_reference(quantized, "mm", x, r)
    if kind == "negative":
        assert r["x_zp"] == 2**bits_a - 1
    elif kind in ("positive", "zero"):
        assert r["x_zp"] == 0
    if kind == "zero":
        assert r["x_scale"] == 1.0 and not r["x_codes"].any()


@pytest.mark.parametrize("bits_a", [8, 4])
def test_activation_rounds_half_to_even(bits_a, module_tmp):
    """Range [0, 2^b - 1] gives scale exactly 1: x = k + 0.5 must round to the even neighbour."""
    model, w, _ = _matmul_model(module_tmp, (5, 12), 12, 7, filename="matmul_2d.onnx")
    quantized = quantize(model, _uniform(model, 4, bits_a), force_rewrite=True)
    qmax = 2**bits_a - 1
    x = np.zeros((5, 12), F32)
    x[0, :6] = [0.5, 1.5, 2.5, 3.5, 4.5, qmax]
    x[1, :3] = [5.5, 6.5, qmax - 0.5]
    r = ref.matmul_layer(x, w, None, 4, bits_a, False)
    assert r["x_scale"] == 1.0
    np.testing.assert_array_equal(r["x_codes"][0, :6], [0, 2, 2, 4, 4, qmax])
    np.testing.assert_array_equal(r["x_codes"][1, :3], [6, 6, qmax - 1])  # qmax - 1 is even
    _check_layer_against_reference(quantized, "mm", x, r)


def test_shared_input_quantized_once_per_width(tmp_path):
    """Two layers reading the same tensor: one quantizer when the widths agree, one each when they differ."""
    rng = np.random.default_rng(3)
    w1, w2 = (rng.standard_normal((8, 5)).astype(F32) for _ in range(2))
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
        helper.make_node("MatMul", ["x", "W2"], ["b"], name="mm2"),
        helper.make_node("Add", ["a", "b"], ["y"], name="sum"),
    ]
    model = _save_model(tmp_path, nodes, {"W1": w1, "W2": w2}, (3, 8))
    x = _x(rng, (3, 8))
    for bits_a2 in (8, 4):
        policy = _resolve(model, {"weight_bits": 4, "activation_bits": 8}, {"mm2": {"activation_bits": bits_a2}})
        quantized = quantize(model, policy)
        r1 = ref.matmul_layer(x, w1, None, 4, 8, False)
        r2 = ref.matmul_layer(x, w2, None, 4, bits_a2, False)
        _check_layer_against_reference(quantized, "mm1", x, r1)
        _check_layer_against_reference(quantized, "mm2", x, r2)
        same = quantized.layer_tensors["mm1"]["x_codes"] == quantized.layer_tensors["mm2"]["x_codes"]
        assert same == (bits_a2 == 8)
        _assert_close(_run_y(quantized.proto, x), r1["y"] + r2["y"], "sum of both layers")


def test_old_opset_model_is_upgraded(tmp_path):
    """Opset 10 lacks Round / Clip-with-inputs: quantize upgrades the model and computes the same codes."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 2, 3, 3)).astype(F32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["y"], name="flatten"),
    ]
    model = _save_model(tmp_path, nodes, {"W": w}, (2, 2, 4, 4), opset=10)
    quantized = quantize(model, _uniform(model, 4, 6))
    x = _x(rng, (2, 2, 4, 4))
    r = ref.conv_layer(x, w, None, 4, 6, False, pads=(1, 1, 1, 1))
    _check_layer_against_reference(quantized, "conv", x, r)


def test_rewrite_of_weight_listed_as_graph_input(tmp_path):
    """ONNX lets an initializer also appear in graph.input (an overridable default; IR < 4 exporters do it always)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3)).astype(F32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = _save_model(
        tmp_path, nodes, {"W": w}, (2, 6), extra_inputs=[helper.make_tensor_value_info("W", TensorProto.FLOAT, [6, 3])]
    )
    assert model.input_name == "x"
    quantized = quantize(model, _uniform(model, 4, 8))
    x = _x(rng, (2, 6))
    _assert_close(_run_y(quantized.proto, x), ref.matmul_layer(x, w, None, 4, 8, False)["y"], "output")


# ---------------------------------------------------------------- multi-layer model, mixed policy


def _chain_model(tmp_path):
    """Conv -> Relu -> Conv(stride 2, group 2) -> Flatten -> Gemm(transB, C) -> Relu -> MatMul -> Add.

    Input and first-Conv weights/bias are small dyadic rationals, so the first Conv in float32 is exact in
    any summation order: with that layer fp32 the NumPy chain and ORT agree bit for bit downstream."""
    rng = np.random.default_rng(7)
    w1 = (rng.integers(-8, 9, (4, 3, 3, 3)) / 16).astype(F32)
    b1 = (rng.integers(-8, 9, 4) / 256).astype(F32)
    w2 = (rng.standard_normal((6, 2, 3, 3)) * 0.3).astype(F32)
    b2 = rng.standard_normal(6).astype(F32) * F32(0.1)
    w3 = (rng.standard_normal((10, 6 * 3 * 3)) * 0.2).astype(F32)  # Gemm B stored [N, K], transB=1
    c3 = rng.standard_normal(10).astype(F32) * F32(0.1)
    w4 = (rng.standard_normal((10, 5)) * 0.4).astype(F32)
    b4 = rng.standard_normal(5).astype(F32) * F32(0.1)
    inits = {"W1": w1, "B1": b1, "W2": w2, "B2": b2, "W3": w3, "C3": c3, "W4": w4, "B4": b4}
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", strides=[2, 2], pads=[1, 1, 1, 1], group=2),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3", "C3"], ["g"], name="fc1", transB=1),
        helper.make_node("Relu", ["g"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "W4"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "B4"], ["y"], name="fc2_bias"),
    ]
    model = _save_model(tmp_path, nodes, inits, (3, 3, 6, 6), filename="chain.onnx")
    return model, inits


def _chain_input(rng, batch=3):
    return (rng.integers(-32, 33, (batch, 3, 6, 6)) / 16).astype(F32)


def _float_conv(x, w, b, pads, strides=(1, 1), group=1):
    """Float Conv in float64 (used only where it is exact or last), via an integer-free im2col."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    oh, ow = (h - kh) // strides[0] + 1, (wd - kw) // strides[1] + 1
    mg = m // group
    out = np.zeros((n, m, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + strides[0] * (oh - 1) + 1 : strides[0], j : j + strides[1] * (ow - 1) + 1 : strides[1]]
            for g in range(group):
                out[:, g * mg : (g + 1) * mg] += np.einsum(
                    "nchw,mc->nmhw", patch[:, g * cg : (g + 1) * cg], w[g * mg : (g + 1) * mg, :, i, j].astype(np.float64)
                )
    return (out + b.astype(np.float64).reshape(1, -1, 1, 1)).astype(F32)


def _chain_reference(x, inits, mapping, family):
    """The chain in NumPy: quantized layers through the reference, fp32 layers in float."""
    def conv(name, h, w, b, **kw):
        q = mapping[name]
        if q is None:
            return _float_conv(h, w, b, kw["pads"], kw.get("strides", (1, 1)), kw.get("group", 1))
        return ref.conv_layer(h, w, b, q.weight_bits, q.activation_bits, q.per_channel, **kw)["y"]

    h = conv("conv1", x, inits["W1"], inits["B1"], pads=(1, 1, 1, 1))
    h = np.maximum(h, F32(0))
    h = conv("conv2", h, inits["W2"], inits["B2"], strides=(2, 2), pads=(1, 1, 1, 1), group=2)
    h = h.reshape(h.shape[0], -1)
    q = mapping["fc1"]
    if q is None:
        h = (h.astype(np.float64) @ inits["W3"].T.astype(np.float64) + inits["C3"]).astype(F32)
    else:
        h = ref.gemm_layer(h, inits["W3"], inits["C3"], q.weight_bits, q.activation_bits, q.per_channel, trans_b=True,
                           family=family)["y"]
    h = np.maximum(h, F32(0))
    q = mapping["fc2"]
    if q is None:
        h = (h.astype(np.float64) @ inits["W4"].astype(np.float64)).astype(F32)
    else:
        h = ref.matmul_layer(h, inits["W4"], None, q.weight_bits, q.activation_bits, q.per_channel, family)["y"]
    return h + inits["B4"]


MIXED_POLICIES = {
    # first Conv fp32 (exact in float32, see _chain_model): every downstream code must match exactly
    "first_fp32": dict(
        rules={"conv1": "fp32", "conv2": {"weight_bits": 3, "activation_bits": 5, "granularity": "per-channel"},
               "fc1": {"weight_bits": 8, "activation_bits": 4}, "@last": {"weight_bits": 2}},
        rtol=1e-6,
    ),
    # last layer fp32: only float rounding of the final product differs
    "last_fp32": dict(
        rules={"@first": {"weight_bits": 8, "granularity": "per-channel"}, "conv2": {"activation_bits": 6},
               "@Gemm": {"weight_bits": 7, "granularity": "per-channel"}, "fc2": "fp32"},
        rtol=1e-5,
    ),
}


@pytest.mark.parametrize("case", sorted(MIXED_POLICIES))
def test_mixed_policy_chain_matches_reference(case, tmp_path, ort_kernel_family):
    model, inits = _chain_model(tmp_path)
    assert [layer.name for layer in model.layers] == ["conv1", "conv2", "fc1", "fc2"]
    spec = MIXED_POLICIES[case]
    policy = _resolve(model, {"weight_bits": 4, "activation_bits": 8}, spec["rules"])
    assert len(set(policy.mapping.values())) >= 3
    quantized = quantize(model, policy)
    assert quantized.method == REWRITE
    rng = np.random.default_rng(_seed("chain", case))
    for batch in (4, 1):
        x = _chain_input(rng, batch)
        y = _run_y(quantized.proto, x)
        expected = _chain_reference(x, inits, policy.mapping, ort_kernel_family)
        scale = float(np.max(np.abs(expected)))
        np.testing.assert_allclose(y, expected, rtol=spec["rtol"], atol=spec["rtol"] * scale, err_msg=f"batch {batch}")
        # the quantization must matter: far from the float model
        y_float = _run_y(model.proto, x)
        assert np.max(np.abs(y - y_float)) > 1e-3 * scale


# ---------------------------------------------------------------- W8A8: quantize_dynamic itself


def _direct_quantize_dynamic(model, tmp_path, per_channel=False, reduce_range=False, **kw):
    return ort_quantize_dynamic(model.path, tmp_path / "direct.onnx", per_channel, reduce_range, **kw)


def _dense_model(tmp_path):
    """MatMul/Gemm only: Gemm(transB=1, C) -> Relu -> MatMul -> Add -> Relu -> Gemm(transB=0, C)."""
    rng = np.random.default_rng(9)
    inits = {
        "W1": (rng.standard_normal((16, 12)) * rng.uniform(0.05, 1, (16, 1))).astype(F32),
        "C1": rng.standard_normal(16).astype(F32) * F32(0.1),
        "W2": (rng.standard_normal((16, 8)) * rng.uniform(0.05, 1, (1, 8))).astype(F32),
        "B2": rng.standard_normal(8).astype(F32) * F32(0.1),
        "W3": (rng.standard_normal((8, 5)) * rng.uniform(0.05, 1, (1, 5))).astype(F32),
        "C3": rng.standard_normal(5).astype(F32) * F32(0.1),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "C1"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "B2"], ["a2"], name="fc2_bias"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "W3", "C3"], ["y"], name="fc3"),
    ]
    return _save_model(tmp_path, nodes, inits, (6, 12), filename="dense.onnx")


def _assert_all_layers_integer(proto, model):
    ops = [n.op_type for n in proto.graph.node]
    left = [n.name for n in proto.graph.node if n.op_type in FLOAT_OPS]
    assert not left, f"float Conv/MatMul/Gemm left in the quantized graph: {left}"
    assert sum(op in INTEGER_OPS for op in ops) == len(model.layers), ops


W8_CASES = [
    # (model, policy, per_channel, reduce_range)
    ("chain", "w8a8", False, False),
    ("chain", "w7a8", False, True),
    ("dense", "w8a8", False, False),
    ("dense", "w7a8", False, True),
    ("dense", "w8a8-per-channel", True, False),
    ("dense", {"weight_bits": 7, "activation_bits": 8, "granularity": "per-channel"}, True, True),
]


@pytest.mark.parametrize("model_name,policy_spec,per_channel,reduce_range", W8_CASES,
                         ids=[f"{m}-{p if isinstance(p, str) else 'w7a8-per-channel'}" for m, p, _, _ in W8_CASES])
def test_w8_policies_use_quantize_dynamic_and_match_it(model_name, policy_spec, per_channel, reduce_range, tmp_path):
    model = _chain_model(tmp_path)[0] if model_name == "chain" else _dense_model(tmp_path)
    if isinstance(policy_spec, str):
        policy = load_policy(policy_spec).resolve(model.layers)
    else:
        policy = _resolve(model, policy_spec)
    quantized = quantize(model, policy)
    assert quantized.method == ORT_QUANTIZER
    _assert_all_layers_integer(quantized.proto, model)
    direct = _direct_quantize_dynamic(model, tmp_path, per_channel=per_channel, reduce_range=reduce_range)
    _assert_all_layers_integer(direct, model)
    rewrite = quantize(model, policy, force_rewrite=True)
    assert rewrite.method == REWRITE
    _assert_all_layers_integer(rewrite.proto, model)
    # 8-bit activations are ORT's own DynamicQuantizeLinear in the rewrite too (one per distinct input tensor)
    assert any(n.op_type == "DynamicQuantizeLinear" for n in rewrite.proto.graph.node)

    rng = np.random.default_rng(_seed("w8", model_name, str(policy_spec)))
    shape = (5, 3, 6, 6) if model_name == "chain" else (5, 12)
    for batch_x in (_x(rng, shape), _x(rng, shape)[:1]):
        if model_name == "chain":
            batch_x = _chain_input(rng, batch_x.shape[0]) * F32(1.3)
        y_ours = _run_y(quantized.proto, batch_x)
        y_direct = _run_y(direct, batch_x)
        y_rewrite = _run_y(rewrite.proto, batch_x)
        assert np.array_equal(y_ours, y_direct), f"ptqaudit vs quantize_dynamic: max diff {np.max(np.abs(y_ours - y_direct))}"
        assert np.array_equal(y_rewrite, y_direct), (
            f"forced rewrite vs quantize_dynamic: max diff {np.max(np.abs(y_rewrite - y_direct))}"
        )
        assert np.max(np.abs(y_ours - _run_y(model.proto, batch_x))) > 0  # quantization did happen


def test_per_channel_with_conv_uses_rewrite(tmp_path, ort_kernel_family):
    """quantize_dynamic cannot quantize Conv per channel (see the canary below): the rewrite does it."""
    model, inits = _chain_model(tmp_path)
    policy = load_policy("w8a8-per-channel").resolve(model.layers)
    quantized = quantize(model, policy)
    assert quantized.method == REWRITE
    x = _chain_input(np.random.default_rng(1), 4) * F32(0.7)
    expected = _chain_reference(x, inits, policy.mapping, ort_kernel_family)
    np.testing.assert_allclose(_run_y(quantized.proto, x), expected, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(expected))))


@pytest.mark.parametrize("bits", [(4, 8), (8, 4), (2, 8), (8, 7)])
def test_policies_quantize_dynamic_cannot_express_use_rewrite(bits, tmp_path):
    model = _dense_model(tmp_path)
    assert quantize(model, _uniform(model, *bits)).method == REWRITE


def test_two_w8_settings_use_rewrite(tmp_path):
    model = _dense_model(tmp_path)
    policy = _resolve(model, {"weight_bits": 8, "activation_bits": 8}, {"fc2": {"weight_bits": 7}})
    assert quantize(model, policy).method == REWRITE


# ---------------------------------------------------------------- canaries: ORT behaviour the path choice relies on


def test_canary_quantize_dynamic_per_channel_leaves_conv_per_tensor(tmp_path):
    model, _ = _chain_model(tmp_path)
    direct = _direct_quantize_dynamic(model, tmp_path, per_channel=True)
    inits = _initializers(direct)
    conv_integers = [n for n in direct.graph.node if n.op_type == "ConvInteger"]
    assert len(conv_integers) == 2
    for node in conv_integers:
        base = node.input[1][: -len("_quantized")]
        scale = inits[base + "_scale"]
        assert scale.size == 1, (
            f"onnxruntime {ort.__version__}'s quantize_dynamic(per_channel=True) now quantizes Conv weights per "
            f"channel (scale shape {scale.shape}): the path selection in ptqaudit.quantize.ort_quantizer_applies "
            "(which sends per-channel policies with Conv layers to the rewrite) must be revisited"
        )


def test_canary_quantize_dynamic_selects_gemm_by_matmul_name(tmp_path):
    """quantize_dynamic turns every plain Gemm into MatMul '<gemm>_MatMul' before selecting nodes: listing the Gemm's
    own name quantizes nothing. ptqaudit's ORT path relies on this naming (quantize._quantize_with_ort)."""
    model = _dense_model(tmp_path)
    by_own_name = _direct_quantize_dynamic(model, tmp_path, nodes_to_quantize=["fc1"])
    assert not [n for n in by_own_name.graph.node if n.op_type in INTEGER_OPS], (
        "quantize_dynamic now quantizes a Gemm listed by its own name: revisit quantize._quantize_with_ort's targets"
    )
    by_matmul_name = _direct_quantize_dynamic(model, tmp_path, nodes_to_quantize=["fc1_MatMul"])
    assert [n.op_type for n in by_matmul_name.graph.node if n.op_type in INTEGER_OPS] == ["MatMulInteger"]


# ---------------------------------------------------------------- fp32 layers


def test_fp32_layers_stay_float_on_rewrite(tmp_path):
    model, _ = _chain_model(tmp_path)
    policy = _resolve(model, {"weight_bits": 4, "activation_bits": 8}, {"conv2": "fp32", "fc1": "fp32"})
    quantized = quantize(model, policy)
    assert quantized.method == REWRITE
    ops = {n.name: n.op_type for n in quantized.proto.graph.node}
    assert ops["conv2"] == "Conv" and ops["fc1"] == "Gemm"
    assert "conv1" not in ops and "fc2" not in ops  # replaced by the integer graph
    assert set(quantized.layer_tensors) == {"conv1", "fc2"}
    assert sum(op in INTEGER_OPS for op in ops.values()) == 2


def test_fp32_layer_stays_float_on_quantize_dynamic_path(tmp_path):
    model, _ = _chain_model(tmp_path)
    policy = _resolve(model, {"weight_bits": 8, "activation_bits": 8}, {"conv2": "fp32"})
    quantized = quantize(model, policy)
    assert quantized.method == ORT_QUANTIZER
    ops = {n.name: n.op_type for n in quantized.proto.graph.node}
    assert ops.get("conv2") == "Conv"
    assert "conv1" not in ops and "fc1_MatMul" not in ops and "fc2" not in ops
    assert sum(op in INTEGER_OPS for op in ops.values()) == 3
    direct = _direct_quantize_dynamic(model, tmp_path, nodes_to_quantize=["conv1", "fc1_MatMul", "fc2"])
    x = _chain_input(np.random.default_rng(2), 3)
    assert np.array_equal(_run_y(quantized.proto, x), _run_y(direct, x))


def test_fp32_gemm_stays_float_on_quantize_dynamic_path(tmp_path):
    """quantize_dynamic rewrites every Gemm into MatMul + Add, quantized or not: an fp32 Gemm stays float but its
    node is then named '<gemm>_MatMul' (the name 'fc1' is gone from the ORT path's graph)."""
    model, _ = _chain_model(tmp_path)
    policy = _resolve(model, {"weight_bits": 8, "activation_bits": 8}, {"fc1": "fp32"})
    quantized = quantize(model, policy)
    assert quantized.method == ORT_QUANTIZER
    ops = {n.name: n.op_type for n in quantized.proto.graph.node}
    assert ops.get("fc1") == "Gemm" or ops.get("fc1_MatMul") == "MatMul", ops
    assert sum(op in INTEGER_OPS for op in ops.values()) == 3


def test_all_fp32_returns_model_unchanged(tmp_path):
    model, _ = _chain_model(tmp_path)
    before = model.proto.SerializeToString()
    policy = _resolve(model, "fp32")
    assert not policy.quantized
    quantized = quantize(model, policy)
    assert quantized.method == "fp32"
    assert quantized.proto.SerializeToString() == before
    assert quantized.layer_tensors == {}


@pytest.mark.parametrize("policy_name", ["w8a8", "w4a8"])
def test_quantize_leaves_the_loaded_model_untouched(policy_name, tmp_path):
    model, _ = _chain_model(tmp_path)
    before = model.proto.SerializeToString()
    quantize(model, load_policy(policy_name).resolve(model.layers))
    quantize(model, load_policy(policy_name).resolve(model.layers), force_rewrite=True)
    assert model.proto.SerializeToString() == before


def test_quantized_model_save_roundtrip(tmp_path):
    model, _ = _chain_model(tmp_path)
    quantized = quantize(model, load_policy("w4a4").resolve(model.layers))
    out = tmp_path / "sub" / "q.onnx"
    quantized.save(out)
    assert out.read_bytes() == quantized.proto.SerializeToString()
    assert [p.name for p in out.parent.iterdir()] == ["q.onnx"]  # no temporary file left behind


# ---------------------------------------------------------------- the shared ResNet-20


@pytest.fixture(scope="module")
def resnet20(request, tmp_path_factory):
    path = request.getfixturevalue("resnet20_path")
    model = load_model(path)
    direct = _direct_quantize_dynamic(model, tmp_path_factory.mktemp("resnet20"))
    return model, direct


def test_resnet20_w8a8_matches_quantize_dynamic(resnet20):
    model, direct = resnet20
    policy = load_policy("w8a8").resolve(model.layers)
    quantized = quantize(model, policy)
    assert quantized.method == ORT_QUANTIZER
    _assert_all_layers_integer(quantized.proto, model)
    _assert_all_layers_integer(direct, model)
    x = np.random.default_rng(20).random((64, 3, 32, 32), dtype=F32)
    ours, theirs = _session(quantized.proto), _session(direct)
    name = ours.get_inputs()[0].name
    y_ours = ours.run(None, {name: x})[0]
    y_direct = theirs.run(None, {name: x})[0]
    assert y_ours.shape == (64, 10)
    assert np.array_equal(y_ours, y_direct)
    for i in range(64):
        one = x[i : i + 1]
        assert np.array_equal(ours.run(None, {name: one})[0], theirs.run(None, {name: one})[0]), f"input {i}"


def test_resnet20_forced_rewrite_matches_quantize_dynamic(resnet20):
    model, direct = resnet20
    rewrite = quantize(model, load_policy("w8a8").resolve(model.layers), force_rewrite=True)
    assert rewrite.method == REWRITE
    _assert_all_layers_integer(rewrite.proto, model)
    x = np.random.default_rng(21).random((16, 3, 32, 32), dtype=F32)
    y_rewrite = _run_y(rewrite.proto, x)
    y_direct = _run_y(direct, x)
    assert np.array_equal(y_rewrite, y_direct), f"max diff {np.max(np.abs(y_rewrite - y_direct))}"
