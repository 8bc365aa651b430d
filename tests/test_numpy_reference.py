"""Checks the NumPy reference (tests/numpy_reference.py) against ONNX Runtime's quantize_dynamic graphs, bit for bit."""

from __future__ import annotations

import zlib

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import quant_utils

import numpy_reference as ref
from reference_cases import CONV_CASES, conv_kwargs, ort_quantize_dynamic

from ptqaudit.onnx_graph import with_outputs

OPSET = 17
F32 = np.float32


# ---------------------------------------------------------------- helpers


def _model(nodes, inits, x_shape, extra_inputs=()):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)), *extra_inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return m


def _quantize(model, tmp_path, per_channel, reduce_range, **kw):
    return ort_quantize_dynamic(model, tmp_path / "q.onnx", per_channel, reduce_range, **kw)


def _session(model, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run_quantized(qmodel, x):
    """Runs the quantized model twice: unoptimised with intermediates exposed, and with default optimisations.

    Returns (dict of intermediates, y from the exposed run, y from the default-optimised session, weights).
    """
    (int_node,) = [n for n in qmodel.graph.node if n.op_type in ("ConvInteger", "MatMulInteger")]
    (dql,) = [n for n in qmodel.graph.node if n.op_type == "DynamicQuantizeLinear"]
    inits = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    w_q_name = int_node.input[1]
    base = w_q_name[: -len("_quantized")]
    weights = {
        "w_codes": inits[w_q_name],
        "w_scale": inits[base + "_scale"],
        "w_zp": inits[base + "_zero_point"],
    }
    names = {"x_codes": dql.output[0], "x_scale": dql.output[1], "x_zp": dql.output[2], "acc": int_node.output[0]}
    outs = _session(with_outputs(qmodel, names.values()), ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(
        ["y", *names.values()], {"x": x}
    )
    got = dict(zip(names, outs[1:]))
    y_default = _session(qmodel, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(["y"], {"x": x})[0]
    return got, outs[0], y_default, weights, int_node


def _assert_bitwise(a, b, what):
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert a.tobytes() == b.tobytes(), f"{what}: differs at {np.flatnonzero(a.ravel() != b.ravel())[:10]}"


def _compare(r, got, y_exposed, y_default, weights, *, ort_w_scale=None, check_weights=True):
    if check_weights:
        _assert_bitwise(r["w_codes"], weights["w_codes"], "weight codes")
        _assert_bitwise(r["w_scale"], weights["w_scale"] if ort_w_scale is None else ort_w_scale, "weight scales")
        assert not np.any(weights["w_zp"]), "ORT weight zero point is not 0"
    _assert_bitwise(r["x_codes"], got["x_codes"], "activation codes")
    _assert_bitwise(np.asarray(r["x_scale"]), got["x_scale"], "activation scale")
    _assert_bitwise(np.asarray(r["x_zp"]), got["x_zp"], "activation zero point")
    _assert_bitwise(r["acc"], got["acc"], "int32 accumulator")
    diff_exposed = float(np.max(np.abs(r["y"] - y_exposed))) if y_exposed.size else 0.0
    diff_default = float(np.max(np.abs(r["y"] - y_default))) if y_default.size else 0.0
    print(f"max|y_ref - y_ort| unoptimised={diff_exposed:.3g} default-optimised={diff_default:.3g}")
    _assert_bitwise(r["y"], y_exposed, "y (unoptimised session)")
    scale = float(np.max(np.abs(y_exposed))) or 1.0
    assert diff_default <= 1e-6 * scale, f"default-optimised session differs by {diff_default}"


def _x(rng, shape, kind="mixed"):
    x = rng.standard_normal(shape).astype(F32) * F32(2.0)
    if kind == "mixed":
        x = x - F32(0.3)
        x.flat[0] = F32(7.5)  # one large value: its range is shared by the whole batch
    elif kind == "negative":
        x = -np.abs(x) - F32(0.01)
    elif kind == "positive":
        x = np.abs(x)
    elif kind == "zero":
        x = np.zeros(shape, F32)
    return x


PC_RR = [(pc, rr) for pc in (False, True) for rr in (False, True)]


# ---------------------------------------------------------------- Conv against quantize_dynamic

@pytest.mark.parametrize("per_channel,reduce_range", PC_RR)
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_quantize_dynamic(case, per_channel, reduce_range, tmp_path):
    spec = CONV_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    w = (rng.standard_normal(spec["w"]) * 0.3).astype(F32)
    b = rng.standard_normal(spec["w"][0]).astype(F32) if spec["bias"] else None
    inits = {"W": w} | ({"B": b} if b is not None else {})
    node = helper.make_node("Conv", ["x", "W"] + (["B"] if b is not None else []), ["y"], name="conv", **spec["attrs"])
    qmodel = _quantize(_model([node], inits, spec["x"]), tmp_path, per_channel, reduce_range)
    bits_w = 7 if reduce_range else 8
    for kind in ("mixed", "negative", "positive", "zero"):
        x = _x(rng, spec["x"], kind)
        got, y_exp, y_def, weights, _ = _run_quantized(qmodel, x)
        # quantize_dynamic ignores per_channel for Conv: the ORT graph is always per tensor.
        assert weights["w_scale"].shape == ()
        r = ref.conv_layer(x, w, b, bits_w, 8, False, **conv_kwargs(spec["attrs"]))
        _compare(r, got, y_exp, y_def, weights)
        if kind == "zero":
            assert got["x_scale"] == 1.0 and got["x_zp"] == 0 and not got["x_codes"].any()


@pytest.mark.parametrize("reduce_range", [False, True])
def test_conv_per_channel_against_ort_kernels(reduce_range, tmp_path):
    """Per-channel Conv (not produced by quantize_dynamic): weights vs ORT's quantize_data per channel, output vs
    a hand-built ORT graph DynamicQuantizeLinear -> ConvInteger(w_zp scalar 0) -> Cast
    -> Mul(x_scale * w_scale[M,1,1]) -> Add(Reshape(B, [1,-1,1,1]))."""
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((6, 2, 3, 3)) * rng.uniform(0.01, 2.0, (6, 1, 1, 1))).astype(F32)
    w[3] = 0.0  # an all-zero channel: ORT uses scale 1.0
    b = rng.standard_normal(6).astype(F32)
    attrs = dict(group=2, pads=[1, 0, 1, 2], strides=[1, 2])
    bits_w = 7 if reduce_range else 8
    codes, scales = ref.quantize_weight(w, bits_w, per_channel=True, axis=0)
    for m in range(w.shape[0]):
        zp, sc, q = quant_utils.quantize_data(w[m].flatten(), TensorProto.INT8, True, reduce_range=reduce_range)
        assert zp == 0
        _assert_bitwise(scales[m : m + 1], np.asarray(sc, F32).reshape(1), f"scale of channel {m}")
        _assert_bitwise(codes[m].ravel(), q.astype(np.int8), f"codes of channel {m}")
    assert scales[3] == 1.0 and not codes[3].any()

    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_s", "x_zp"]),
        helper.make_node("ConvInteger", ["x_q", "Wq", "x_zp", "Wzp"], ["acc"], **attrs),
        helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x_s", "Ws"], ["s"]),
        helper.make_node("Mul", ["acc_f", "s"], ["t"]),
        helper.make_node("Reshape", ["B", "shape"], ["Br"]),
        helper.make_node("Add", ["t", "Br"], ["y"]),
    ]
    inits = {"Wq": codes, "Wzp": np.int8(0), "Ws": scales.reshape(-1, 1, 1), "B": b,
             "shape": np.array([1, -1, 1, 1], np.int64)}
    model = _model(nodes, inits, (3, 4, 6, 7))
    sess = _session(with_outputs(model, ["x_q", "x_s", "x_zp", "acc"]), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    x = _x(rng, (3, 4, 6, 7))
    y, xq, xs, xzp, acc = sess.run(None, {"x": x})
    r = ref.conv_layer(x, w, b, bits_w, 8, True, **conv_kwargs(attrs))
    _assert_bitwise(r["w_codes"], codes, "weight codes")
    _compare(r, {"x_codes": xq, "x_scale": xs, "x_zp": xzp, "acc": acc}, y, y, None, check_weights=False)


# ---------------------------------------------------------------- MatMul against quantize_dynamic

MATMUL_CASES = {
    "2d_bias": dict(x=(5, 6), w=(6, 4), bias=True),
    "3d_nobias": dict(x=(2, 3, 6), w=(6, 7), bias=False),
    "batch1_bias": dict(x=(1, 16), w=(16, 3), bias=True),
}


@pytest.mark.parametrize("per_channel,reduce_range", PC_RR)
@pytest.mark.parametrize("case", sorted(MATMUL_CASES))
def test_matmul_matches_quantize_dynamic(case, per_channel, reduce_range, tmp_path, ort_kernel_family):
    spec = MATMUL_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()) + 1)
    # column scales spread over two decades so per-column scales differ visibly
    w = (rng.standard_normal(spec["w"]) * rng.uniform(0.01, 1.0, (1, spec["w"][1]))).astype(F32)
    b = rng.standard_normal(spec["w"][1]).astype(F32) if spec["bias"] else None
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t" if b is not None else "y"], name="mm")]
    if b is not None:
        nodes.append(helper.make_node("Add", ["t", "B"], ["y"], name="add"))
    inits = {"W": w} | ({"B": b} if b is not None else {})
    qmodel = _quantize(_model(nodes, inits, spec["x"]), tmp_path, per_channel, reduce_range)
    bits_w = 7 if reduce_range else 8
    for kind in ("mixed", "negative", "positive", "zero"):
        x = _x(rng, spec["x"], kind)
        got, y_exp, y_def, weights, _ = _run_quantized(qmodel, x)
        assert weights["w_scale"].shape == ((spec["w"][1],) if per_channel else ())
        r = ref.matmul_layer(x, w, b, bits_w, 8, per_channel, ort_kernel_family)
        _compare(r, got, y_exp, y_def, weights)


# ---------------------------------------------------------------- Gemm against quantize_dynamic

GEMM_CASES = {
    "transB1_bias": dict(x=(4, 6), w=(5, 6), c=(5,), trans_b=1),
    "transB0_matrixC": dict(x=(3, 6), w=(6, 5), c=(3, 5), trans_b=0),
    "transB1_noC": dict(x=(2, 8), w=(3, 8), c=None, trans_b=1),
}


@pytest.mark.parametrize("per_channel,reduce_range", PC_RR)
@pytest.mark.parametrize("case", sorted(GEMM_CASES))
def test_gemm_matches_quantize_dynamic(case, per_channel, reduce_range, tmp_path, ort_kernel_family):
    spec = GEMM_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()) + 2)
    w = (rng.standard_normal(spec["w"]) * rng.uniform(0.01, 1.0, spec["w"])).astype(F32)
    c = rng.standard_normal(spec["c"]).astype(F32) if spec["c"] else None
    node = helper.make_node("Gemm", ["x", "W"] + (["C"] if c is not None else []), ["y"], name="gemm",
                            transB=spec["trans_b"])
    inits = {"W": w} | ({"C": c} if c is not None else {})
    qmodel = _quantize(_model([node], inits, spec["x"]), tmp_path, per_channel, reduce_range)
    ops = [n.op_type for n in qmodel.graph.node]
    assert "Gemm" not in ops and "MatMulInteger" in ops, ops  # rewritten to MatMul (+ Add) and quantized
    bits_w = 7 if reduce_range else 8
    for kind in ("mixed", "negative"):
        x = _x(rng, spec["x"], kind)
        got, y_exp, y_def, weights, int_node = _run_quantized(qmodel, x)
        expected_name = "W_Transposed_quantized" if spec["trans_b"] else "W_quantized"
        assert int_node.input[1] == expected_name and int_node.name == "gemm_MatMul_quant"
        n_out = spec["w"][0] if spec["trans_b"] else spec["w"][1]
        assert weights["w_scale"].shape == ((n_out,) if per_channel else ())  # per output feature
        r = ref.gemm_layer(x, w, c, bits_w, 8, per_channel, trans_b=bool(spec["trans_b"]), family=ort_kernel_family)
        _compare(r, got, y_exp, y_def, weights)


@pytest.mark.parametrize("per_channel", [False, True])
def test_gemm_alpha_beta(per_channel, tmp_path, ort_kernel_family):
    """quantize_dynamic leaves Gemm with alpha/beta != 1 in float; gemm_layer = the folded MatMul + Add rewrite."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((5, 6)).astype(F32)
    c = rng.standard_normal(5).astype(F32)
    alpha, beta = 0.37, 2.5
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=1, alpha=alpha, beta=beta)
    q = _quantize(_model([node], {"W": w, "C": c}, (4, 6)), tmp_path, per_channel, False)
    assert [n.op_type for n in q.graph.node] == ["Gemm"]  # not quantized at all
    folded = _model(
        [helper.make_node("MatMul", ["x", "W"], ["t"]), helper.make_node("Add", ["t", "C"], ["y"])],
        {"W": (F32(alpha) * w.T).astype(F32), "C": (F32(beta) * c).astype(F32)},
        (4, 6),
    )
    qf = _quantize(folded, tmp_path, per_channel, False)
    x = _x(rng, (4, 6))
    got, y_exp, y_def, weights, _ = _run_quantized(qf, x)
    r = ref.gemm_layer(x, w, c, 8, 8, per_channel, trans_b=True, alpha=alpha, beta=beta, family=ort_kernel_family)
    _compare(r, got, y_exp, y_def, weights)
    y_float = alpha * (x @ w.T) + beta * c
    assert np.max(np.abs(r["y"] - y_float)) < 0.05 * np.max(np.abs(y_float))


def test_gemm_rewrite_renames_node(tmp_path):
    """The Gemm's MatMul is '<name>_MatMul': nodes_to_quantize with the Gemm's own name quantizes nothing."""
    rng = np.random.default_rng(6)
    node = helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)
    m = _model([node], {"W": rng.standard_normal((3, 4)).astype(F32)}, (2, 4))
    by_gemm_name = _quantize(m, tmp_path, False, False, nodes_to_quantize=["fc"])
    assert [n.op_type for n in by_gemm_name.graph.node] == ["MatMul"]
    by_matmul_name = _quantize(m, tmp_path, False, False, nodes_to_quantize=["fc_MatMul"])
    assert "MatMulInteger" in [n.op_type for n in by_matmul_name.graph.node]


# ---------------------------------------------------------------- DynamicQuantizeLinear edge cases vs ORT


def _ort_dql(x):
    g = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, None),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.UINT8, None)],
    )
    m = make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    return _session(m, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), m


def test_activation_matches_ort_dynamicquantizelinear():
    sess, _ = _ort_dql(None)
    rng = np.random.default_rng(7)
    arrays = [
        np.zeros((2, 3), F32),
        -np.arange(1, 7, dtype=F32).reshape(2, 3),  # all negative: zp 255
        np.arange(1, 7, dtype=F32),  # all positive: zp 0
        np.array([-0.0, 0.0], F32),
        np.array([1e-40, 0.0], F32),  # subnormal range still gives a nonzero scale
        np.array([-2.0], F32),
        np.array([3.0, 3.0], F32),
    ]
    for t in range(400):
        n = int(rng.integers(1, 200))
        x = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 7.0, 300.0]) + rng.choice([0.0, 1.0, -3.0])).astype(F32)
        if t % 2:
            x = (np.round(x * 8) / 8).astype(F32)  # many exact ties after division
        arrays.append(x)
    for x in arrays:
        q, s, z = sess.run(None, {"x": x})
        rq, rs, rz = ref.quantize_activation(x, 8)
        _assert_bitwise(rq, q, f"codes for {x[:4]}")
        _assert_bitwise(np.asarray(rs), s, f"scale for {x[:4]}")
        _assert_bitwise(np.asarray(rz), z, f"zero point for {x[:4]}")
    q, s, z = sess.run(None, {"x": np.zeros(5, F32)})
    assert s == 1.0 and z == 0 and not q.any()


def test_weight_quantization_matches_ort_quantize_data():
    rng = np.random.default_rng(8)
    arrays = [np.zeros(5, F32), np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5], F32), np.array([1e-40, -2e-40], F32)]
    for _ in range(300):
        arrays.append((rng.standard_normal(int(rng.integers(1, 100))) * rng.choice([1e-4, 0.1, 3.0])).astype(F32))
    for w in arrays:
        for reduce_range, bits in ((False, 8), (True, 7)):
            zp, sc, q = quant_utils.quantize_data(w, TensorProto.INT8, True, reduce_range=reduce_range)
            codes, scale = ref.quantize_weight(w, bits, per_channel=False, axis=0)
            assert zp == 0
            _assert_bitwise(scale, np.asarray(sc).astype(F32), "scale")
            assert np.asarray(sc).dtype == F32
            _assert_bitwise(codes, q, "codes")
    _, sc, q = quant_utils.quantize_data(np.array([-3.0, 1.0], F32), TensorProto.INT8, True, reduce_range=True)
    assert sc == F32(3.0 / 64) and q.min() == -64  # reduce_range: [-64, 64], scale max|w| / 64


# ---------------------------------------------------------------- b < 8 properties, hand-derived cases


def test_weight_qmax():
    assert [ref.weight_qmax(b) for b in range(2, 9)] == [1, 3, 7, 15, 31, 64, 127]
    with pytest.raises(ValueError):
        ref.weight_qmax(1)


def test_activation_hand_cases():
    # b=2: range [0, 3] -> scale 1, zp 0; ties 1.5 -> 2 and 2.5 -> 2 (half to even)
    q, s, z = ref.quantize_activation(np.array([0, 1, 1.5, 2.5, 3], F32), 2)
    assert (s, int(z), q.tolist()) == (1.0, 0, [0, 1, 2, 2, 3])
    # b=2: range [-1.5, 1.5] -> scale 1, zp rint(1.5) = 2; -1.5 -> -2+2 = 0, -0.5 -> 0+2, 1.5 -> 2+2 clipped to 3
    q, s, z = ref.quantize_activation(np.array([-1.5, -0.5, 0, 1.5], F32), 2)
    assert (s, int(z), q.tolist()) == (1.0, 2, [0, 2, 2, 3])
    # b=4 all negative: scale 1, zp 15; -7.5 -> -8 + 15 = 7
    q, s, z = ref.quantize_activation(np.array([-15, -7.5, -1], F32), 4)
    assert (s, int(z), q.tolist()) == (1.0, 15, [0, 7, 14])
    # all zero at any width: scale 1, zp 0, codes 0 (ORT's behaviour)
    for bits in range(1, 9):
        q, s, z = ref.quantize_activation(np.zeros((2, 2), F32), bits)
        assert s == 1.0 and z == 0 and not q.any()
    # batch-wide range: one large sample coarsens the other's codes
    x = np.array([[0.1, -0.1], [100.0, 0.0]], F32)
    q_alone, _, _ = ref.quantize_activation(x[:1], 8)
    q_batch, s_batch, z_batch = ref.quantize_activation(x, 8)
    assert len(set(q_alone[0].tolist())) == 2 and q_batch[0, 0] == q_batch[0, 1] == z_batch


@pytest.mark.parametrize("bits", range(2, 9))
def test_activation_properties(bits):
    rng = np.random.default_rng(bits)
    qmax = 2**bits - 1
    for kind in ("mixed", "negative", "positive"):
        x = _x(rng, (3, 50), kind)
        q, s, z = ref.quantize_activation(x, bits)
        assert q.dtype == np.uint8 and q.min() >= 0 and q.max() <= qmax and 0 <= z <= qmax
        assert s == F32((np.maximum(x.max(), 0) - np.minimum(x.min(), 0)) / F32(qmax))
        err = np.abs((q.astype(np.float64) - float(z)) * float(s) - x)
        assert err.max() <= 1.0001 * float(s)  # within one step (zero point rounding adds up to half a step)
        if kind != "mixed":
            assert int(z) == (0 if kind == "positive" else qmax)


def test_weight_hand_cases():
    c, s = ref.quantize_weight(np.array([7, 3.5, -2.5, 0.5, -7], F32), 4, False, 0)
    assert s == 1.0 and c.tolist() == [7, 4, -2, 0, -7]
    c, s = ref.quantize_weight(np.array([2, 1, -1, 0.4], F32), 2, False, 0)
    assert s == 2.0 and c.tolist() == [1, 0, 0, 0]
    c, s = ref.quantize_weight(np.array([64, 32.5, -0.5, 63.5, -64], F32), 7, False, 0)
    assert s == 1.0 and c.tolist() == [64, 32, 0, 64, -64]
    c, s = ref.quantize_weight(np.zeros((2, 3), F32), 8, True, 1)
    assert s.tolist() == [1.0, 1.0, 1.0] and not c.any()
    w = np.array([[3.75, -30.0], [-7.5, 15.0], [2.75, 13.0]], F32)
    c, s = ref.quantize_weight(w, 5, True, 1)  # per column, qmax 15: scales 0.5 and 2.0
    assert s.tolist() == [0.5, 2.0] and c.tolist() == [[8, -15], [-15, 8], [6, 6]]  # 7.5->8, 5.5->6, 6.5->6


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_properties(bits):
    rng = np.random.default_rng(100 + bits)
    qmax = ref.weight_qmax(bits)
    w = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    for per_channel in (False, True):
        c, s = ref.quantize_weight(w, bits, per_channel, 0)
        assert c.dtype == np.int8 and np.abs(c).max() == qmax  # the largest |w| maps to +-qmax
        sb = s.reshape(-1, 1, 1, 1) if per_channel else s
        assert np.all(np.abs(c * sb - w) <= 0.5001 * sb)


# ---------------------------------------------------------------- integer kernels vs float64 loops


def _conv_float64(xq, xzp, wq, strides, pads, dilations, group):
    x = xq.astype(np.float64) - float(xzp)
    w = wq.astype(np.float64)
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    oh = (h - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((n, m, oh, ow))
    mg = m // group
    for oc in range(m):
        g = oc // mg
        for i in range(oh):
            for j in range(ow):
                r0, c0 = i * strides[0], j * strides[1]
                win = x[:, g * cg : (g + 1) * cg, r0 : r0 + dilations[0] * (kh - 1) + 1 : dilations[0],
                        c0 : c0 + dilations[1] * (kw - 1) + 1 : dilations[1]]
                out[:, oc, i, j] = np.sum(win * w[oc], axis=(1, 2, 3))
    return out


@pytest.mark.parametrize(
    "xs,ws,strides,pads,dil,group",
    [
        ((2, 3, 7, 6), (4, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
        ((1, 4, 9, 9), (6, 2, 3, 2), (2, 3), (0, 2, 1, 0), (2, 1), 2),
        ((3, 5, 6, 6), (5, 1, 3, 3), (1, 2), (2, 2, 2, 2), (1, 2), 5),
        ((1, 2, 4, 4), (3, 2, 4, 4), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    ],
)
def test_conv_integer_against_float64(xs, ws, strides, pads, dil, group):
    rng = np.random.default_rng(sum(xs) + sum(ws))
    for bits in (2, 5, 8):
        xq = rng.integers(0, 2**bits, xs).astype(np.uint8)
        xzp = np.uint8(rng.integers(0, 2**bits))
        qm = ref.weight_qmax(bits)
        wq = rng.integers(-qm, qm + 1, ws).astype(np.int8)
        acc = ref.conv_integer(xq, xzp, wq, np.int8(0), strides, pads, dil, group)
        assert acc.dtype == np.int32
        expect = _conv_float64(xq, xzp, wq, strides, pads, dil, group)
        assert np.array_equal(acc.astype(np.float64), expect)
    # per-output-channel weight zero point equals subtracting it from the codes first
    wz = rng.integers(-3, 4, ws[0]).astype(np.int8)
    a1 = ref.conv_integer(xq, xzp, wq, wz, strides, pads, dil, group)
    a2 = ref.conv_integer(xq, xzp, (wq.astype(np.int16) - wz.reshape(-1, 1, 1, 1)), np.int8(0), strides, pads, dil,
                          group)
    assert np.array_equal(a1, a2)


def test_matmul_integer_and_dequantize():
    rng = np.random.default_rng(9)
    a = rng.integers(0, 256, (2, 3, 5)).astype(np.uint8)
    b = rng.integers(-127, 128, (5, 4)).astype(np.int8)
    acc = ref.matmul_integer(a, np.uint8(100), b, np.int8(0))
    expect = np.einsum("bik,kj->bij", a.astype(np.float64) - 100, b.astype(np.float64))
    assert acc.dtype == np.int32 and np.array_equal(acc, expect)
    ws = np.array([0.5, 0.25, 2.0, 1.0], F32)
    y = ref.dequantize_output(acc, F32(0.125), ws, np.ones(4, F32), channel_axis=-1)
    assert y.dtype == F32 and np.array_equal(y, acc.astype(F32) * (F32(0.125) * ws) + F32(1))
    conv_acc = np.arange(2 * 3 * 2 * 2, dtype=np.int32).reshape(2, 3, 2, 2)
    y = ref.dequantize_output(conv_acc, F32(2.0), np.array([1, 2, 3], F32), np.array([0, 10, 20], F32), 1)
    assert np.array_equal(y[:, 2], conv_acc[:, 2] * 6.0 + 20)
    with pytest.raises(AssertionError):
        ref.matmul_integer(np.full((1, 70000), 255, np.uint8), 0, np.full((70000, 1), 127, np.int8), 0)
