"""The simulator against the NumPy integer reference (codes, accumulators) and against ONNX Runtime (top-1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import numpy_reference as ref
from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.evaluate import evaluate
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import LayerQuant, load_policy, parse_policy
from ptqaudit.quantize import quantize
from ptqaudit.sim.engine import sim_predict
from ptqaudit.sim.model import SimModel
from ptqaudit.arithmetic import activation_scale_zero_point, centered_activation_codes, weight_codes

REPO = Path(__file__).resolve().parent.parent
DIGITS_MODEL = REPO / "sample_models" / "digits_cnn.onnx"
BITS = [(8, 8), (4, 8), (4, 4), (2, 8), (3, 5), (7, 8), (8, 2)]


def _inputs(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    x[0].flat[0] = 6.0  # an outlier widens the shared range
    return x


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("kind", ["mixed", "negative", "zeros"])
def test_activation_codes_match_reference(bits, kind):
    rng = np.random.default_rng(bits)
    x = {"mixed": _inputs(rng, (3, 4, 5)), "negative": -np.abs(_inputs(rng, (3, 4, 5))),
         "zeros": np.zeros((3, 4, 5), np.float32)}[kind]
    t = torch.from_numpy(x)
    scale, zp = activation_scale_zero_point(t, bits, per_sample=False)
    centered = centered_activation_codes(t, scale, zp, bits)
    codes, ref_scale, ref_zp = ref.quantize_activation(x, bits)
    assert scale.numpy().reshape(()).tobytes() == np.float32(ref_scale).tobytes()
    assert int(zp.reshape(())) == int(ref_zp)
    np.testing.assert_array_equal(centered.numpy(), codes.astype(np.int64) - int(ref_zp))
    # per sample: each input quantized as if it were alone in its batch
    scale, zp = activation_scale_zero_point(t, bits, per_sample=True)
    centered = centered_activation_codes(t, scale, zp, bits)
    for n in range(len(x)):
        codes, ref_scale, ref_zp = ref.quantize_activation(x[n : n + 1], bits)
        assert scale[n].reshape(()).numpy().tobytes() == np.float32(ref_scale).tobytes()
        np.testing.assert_array_equal(centered[n].numpy(), codes[0].astype(np.int64) - int(ref_zp))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_weight_codes_match_reference(bits, axis):
    w = np.random.default_rng(bits).standard_normal((6, 5, 3, 3) if axis != 1 else (7, 6)).astype(np.float32)
    w[1] = 0.0  # an all-zero channel (or row)
    codes, scale = weight_codes(torch.from_numpy(w), bits, axis)
    ref_codes, ref_scales = ref.quantize_weight(w, bits, per_channel=axis is not None, axis=axis or 0)
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    assert scale.numpy().reshape(-1).tobytes() == np.asarray(ref_scales, np.float32).reshape(-1).tobytes()


def _single_layer_model(tmp_path, op: str, rng) -> tuple[Path, np.ndarray, np.ndarray, dict]:
    """One Conv (pads, stride, groups; flattened after, to be a classifier), MatMul or Gemm (transB=1)
    layer with bias; returns path, weight, bias, attrs."""
    if op == "Conv":
        w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
        b = rng.standard_normal(6).astype(np.float32)
        attrs = dict(pads=[1, 0, 1, 2], strides=[2, 1], group=2)
        node = helper.make_node("Conv", ["x", "w", "b"], ["conv_out"], name="layer", **attrs)
        x_info, y_info = [None, 4, 7, 6], [None, 144]
    elif op == "MatMul":
        w = rng.standard_normal((5, 4)).astype(np.float32)
        b = rng.standard_normal(4).astype(np.float32)
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
        x_info, y_info, attrs = [None, 5], [None, 4], {}
    else:
        w = rng.standard_normal((4, 5)).astype(np.float32)  # transB=1: (N, K)
        b = rng.standard_normal(4).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="layer", transB=1)
        x_info, y_info, attrs = [None, 5], [None, 4], {}
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if op != "MatMul" else [])
    nodes = [node, helper.make_node("Flatten", ["conv_out"], ["y"], name="flatten")] if op == "Conv" else [node]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_info)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_info)], inits)
    path = tmp_path / f"{op}.onnx"
    onnx.save(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, w, (b if op != "MatMul" else None), attrs


@pytest.mark.parametrize("op", ["Conv", "MatMul", "Gemm"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("family", ref.KERNEL_FAMILIES)
def test_single_layer_matches_integer_reference(tmp_path, op, bits, per_channel, family):
    """Codes and the int32 accumulator exactly, the float output to rounding, against NumPy integer math of
    each kernel family, whichever this machine has."""
    rng = np.random.default_rng(hash((op, bits, per_channel)) % 2**32)
    path, w, b, attrs = _single_layer_model(tmp_path, op, rng)
    layer = SimModel(load_model(path), kernel_family=family).quant_layer("layer")
    setting = LayerQuant(bits[0], bits[1], per_channel)
    x = _inputs(rng, (3, 4, 7, 6) if op == "Conv" else (3, 5))
    if op == "Conv":
        r = ref.conv_layer(x, w, b, bits[0], bits[1], per_channel, strides=(2, 1), pads=(1, 0, 1, 2), group=2)
    elif op == "MatMul":
        r = ref.matmul_layer(x, w, None, bits[0], bits[1], per_channel, family)
    else:
        r = ref.gemm_layer(x, w, b, bits[0], bits[1], per_channel, trans_b=True, family=family)
    with torch.no_grad():
        t = torch.from_numpy(x)
        scale, zp = activation_scale_zero_point(t, bits[1], per_sample=False)
        centered = centered_activation_codes(t, scale, zp, bits[1])
        codes = layer._quantized_weight(setting)[0]
        acc = layer._linear(centered, codes, None)
        y = layer(t, setting)
    np.testing.assert_array_equal(centered.numpy(), r["x_codes"].astype(np.int64) - int(r["x_zp"]))
    np.testing.assert_array_equal(codes.numpy(), r["w_codes"])
    if family == "exact":  # the plain integer product; the saturating one is checked through y
        np.testing.assert_array_equal(acc.numpy().astype(np.int64), r["acc"])
    np.testing.assert_allclose(y.numpy(), r["y"], rtol=1e-6, atol=1e-6 * np.abs(r["y"]).max())


@pytest.mark.parametrize("family", ref.KERNEL_FAMILIES)
@pytest.mark.parametrize("shape", [(4, 33), (2, 3, 64)])
@pytest.mark.parametrize("ranges", ["batch", "sample"])
def test_matmul_kernel_family_on_saturating_inputs(tmp_path, family, shape, ranges):
    """Full-range 8-bit codes, where the AVX2 family's int16 pair sums saturate on most outputs: the layer's
    output equals the NumPy oracle of that family (an odd K and a 3-D input included)."""
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    k, n = shape[-1], 9
    w = rng.uniform(-1, 1, (k, n)).astype(np.float32)
    w[0, 0] = 1.0  # a full-range weight code somewhere
    x = rng.uniform(0, 1, shape).astype(np.float32)  # non-negative: codes spread over the whole 0..255
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="layer"), helper.make_node("Flatten", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, *shape[1:]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "mm.onnx"
    onnx.save(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    layer = SimModel(load_model(path), kernel_family=family).quant_layer("layer")
    with torch.no_grad():
        y = layer(torch.from_numpy(x), LayerQuant(8, 8), ranges).numpy()
    samples = [x[i:i + 1] for i in range(len(x))] if ranges == "sample" else [x]
    expected = np.concatenate([ref.matmul_layer(s, w, None, 8, 8, False, family)["y"] for s in samples])
    exact = np.concatenate([ref.matmul_layer(s, w, None, 8, 8, False, "exact")["y"] for s in samples])
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    if family == "avx2-u8s8":  # the inputs do exercise the saturation
        assert np.mean(np.abs(expected - exact) > 1e-3 * np.abs(exact).max()) > 0.3


def _ort_logits(proto, x, batch_size):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


MIXED = {"description": "mixed", "default": {"weight_bits": 4, "activation_bits": 6},
         "layers": {"@first": {"weight_bits": 8, "activation_bits": 8}, "@last": "fp32",
                    "@Gemm": {"weight_bits": 3, "activation_bits": 5, "granularity": "per-channel"}}}


@pytest.mark.parametrize("batch_size", [1, 60])
def test_sim_agrees_with_ort_on_digits_model(batch_size):
    """Top-1 agreement with ORT's kernels (target >= 99.5%) at a per-input and a shared batch range."""
    model = load_model(DIGITS_MODEL)
    dataset = load_dataset(DataConfig(name="digits", limit=240))
    sim = SimModel(model).eval()
    policies = [load_policy(n) for n in ("w8a8", "w4a4", "w2a8", "w4a8-first-last-w8a8", "w8a8-per-channel")]
    policies.append(parse_policy(MIXED, "mixed", "test"))
    for policy in policies:
        resolved = policy.resolve(model.layers)
        expected = _ort_logits(quantize(model, resolved).proto, dataset.x, batch_size)
        got = sim_predict(sim, dataset, resolved, batch_size, progress=False).logits
        agreement = np.mean(expected.argmax(1) == got.argmax(1))
        assert agreement >= 0.995, (policy.name, agreement)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_sim_agrees_with_ort_on_resnet20(resnet20_path, cifar10_root):
    """Quantized logits are ORT's bit for bit: the integer products, the float epilogues and the global
    pooling's summation order all match (the fp32 graph's float convolutions only to rounding)."""
    model = load_model(resnet20_path)
    dataset = load_dataset(DataConfig(name="cifar10", root=cifar10_root, limit=300))
    policies = [load_policy(n) for n in ("w8a8", "w4a8", "w4a4", "w4a8-first-last-w8a8", "w8a8-per-channel")]
    for batch_size in (1, 100):
        report = evaluate(model, dataset, policies, batch_size=batch_size, engine="both", progress=False)
        assert report.fp32_sim.top1_agreement_with_ort == 1.0
        for result in report.results:
            assert result.sim.top1_agreement_with_ort == 1.0, (batch_size, result.policy, result.sim)
            assert result.sim.max_abs_logit_diff == 0.0, (batch_size, result.policy, result.sim)


def test_forward_many_equals_separate_forwards():
    model = load_model(DIGITS_MODEL)
    sim = SimModel(model).eval()
    x = torch.from_numpy(load_dataset(DataConfig(name="digits", limit=40)).x)
    names = ["w8a8", "w4a4", "w4a8", "w4a8-first-last-w8a8", "w2a8"]
    policies = [load_policy(n).resolve(model.layers) for n in names] + [None]
    with torch.no_grad():
        for ranges in ("batch", "sample"):
            together = sim.forward_many(x, policies, ranges)
            for policy, logits in zip(policies, together):
                assert torch.equal(logits, sim(x, policy, ranges))


def test_straight_through_gradients_match_float_layer_at_quantized_values(tmp_path):
    """d/dx and d/dw through the quantizers equal the gradients of the float conv evaluated at the
    dequantized input and weight (straight-through: rounding counts as identity)."""
    rng = np.random.default_rng(7)
    path, w, b, attrs = _single_layer_model(tmp_path, "Conv", rng)
    layer = SimModel(load_model(path)).quant_layer("layer")
    setting = LayerQuant(4, 6, True)
    x = torch.from_numpy(_inputs(rng, (3, 4, 7, 6))).requires_grad_(True)
    upstream = torch.from_numpy(rng.standard_normal((3, 6, 4, 6)).astype(np.float32))
    (layer(x, setting) * upstream).sum().backward()

    with torch.no_grad():
        x_scale, zp = activation_scale_zero_point(x, 6, per_sample=False)
        x_deq = centered_activation_codes(x, x_scale, zp, 6) * x_scale
        codes, w_scale = weight_codes(layer.weight, 4, 0)
        w_deq = codes * w_scale
    x_ref, w_ref = x_deq.clone().requires_grad_(True), w_deq.clone().requires_grad_(True)
    y_ref = F.conv2d(F.pad(x_ref, [0, 2, 1, 1]), w_ref, layer.bias.detach(), stride=(2, 1), groups=2)
    (y_ref * upstream).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), x_ref.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.weight.grad.numpy(), w_ref.grad.numpy(), rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is not None and torch.allclose(layer.bias.grad, upstream.sum(dim=(0, 2, 3)))


@pytest.mark.parametrize("ranges", ["batch", "sample"])
def test_range_gradient_adds_the_scales_derivative_to_the_extreme_values(tmp_path, ranges):
    """With range_gradient, the output is unchanged and d/dx, d/dw gain the term through the min-max scales:
    dL/ds times ds/d(extreme), with the codes' straight-through derivative d(x / s)/ds = -x / s^2, against the
    chain rule written out in NumPy for a MatMul at 4 bits (without it, only the straight-through term)."""
    rng = np.random.default_rng(11)
    path, w, _, _ = _single_layer_model(tmp_path, "MatMul", rng)
    sim = SimModel(load_model(path))
    layer = sim.quant_layer("layer")
    x_np = rng.standard_normal((3, 5)).astype(np.float32)
    upstream = rng.standard_normal((3, 4))
    setting = LayerQuant(4, 4, False)

    x64, w64, qmax, limit = x_np.astype(np.float64), w.astype(np.float64), 15, 7
    axis = 1 if ranges == "sample" else None
    rmin = np.minimum(x64.min(axis=axis, keepdims=True), 0) * np.ones((3, 1))
    rmax = np.maximum(x64.max(axis=axis, keepdims=True), 0) * np.ones((3, 1))
    sx = (rmax - rmin) / qmax
    zp = np.round(np.clip(-rmin / sx, 0, qmax))
    xc = np.clip(np.round(x64 / sx), -zp, qmax - zp)
    inside = (np.round(x64 / sx) >= -zp) & (np.round(x64 / sx) <= qmax - zp)  # the clip passes no gradient
    sw = np.abs(w64).max() / limit
    wc = np.round(w64 / sw)
    grad_xc = (upstream @ wc.T) * sx * sw * inside  # dL/d codes
    grad_wc = xc.T @ (upstream * sx) * sw
    direct_x, direct_w = grad_xc / sx, grad_wc / sw  # straight-through: rounding as identity
    grad_sx = ((upstream * (xc @ wc)) * sw).sum(axis=1, keepdims=True) + (grad_xc * -x64 / sx**2).sum(axis=1, keepdims=True)
    grad_sw = (upstream * (xc @ wc) * sx).sum() + (grad_wc * -w64 / sw**2).sum()
    range_x = np.zeros_like(x64)
    groups = [np.arange(3)] if ranges == "batch" else [[row] for row in range(3)]
    for rows in groups:  # each range's scale moves with its largest and smallest value (when beyond 0)
        block = x64[rows]
        total = grad_sx[rows].sum()
        hi, lo = np.unravel_index(block.argmax(), block.shape), np.unravel_index(block.argmin(), block.shape)
        if block.max() > 0:  # a range widened to include 0 does not move with a value on the far side of 0
            range_x[np.asarray(rows)[hi[0]], hi[1]] += total / qmax
        if block.min() < 0:
            range_x[np.asarray(rows)[lo[0]], lo[1]] -= total / qmax
    range_w = np.zeros_like(w64)
    top = np.unravel_index(np.abs(w64).argmax(), w64.shape)
    range_w[top] = np.sign(w64[top]) * grad_sw / limit

    outputs = []
    for on in (False, True):
        sim.set_range_gradient(on)
        sim.zero_grad()
        x = torch.from_numpy(x_np).requires_grad_(True)
        y = layer(x, setting, ranges)
        (y * torch.from_numpy(upstream).float()).sum().backward()
        outputs.append(y.detach())
        expected_x, expected_w = (direct_x + range_x, direct_w + range_w) if on else (direct_x, direct_w)
        np.testing.assert_allclose(x.grad.numpy(), expected_x, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.weight.grad.numpy(), expected_w, rtol=1e-4, atol=1e-5)
    assert torch.equal(outputs[0], outputs[1])
    assert np.abs(range_x).max() > 1e-3 and np.abs(range_w).max() > 1e-3  # the term the test tells apart


def test_weight_cache_follows_in_place_updates():
    """Cached weight codes must not outlive a change of the weights (as distillation makes)."""
    model = load_model(DIGITS_MODEL)
    sim = SimModel(model).eval()
    policy = load_policy("w4a8").resolve(model.layers)
    x = torch.from_numpy(load_dataset(DataConfig(name="digits", limit=20)).x)
    with torch.no_grad():
        before = sim(x, policy)
        sim.quant_layer(model.layers[1].name).weight.mul_(-0.5)
        after = sim(x, policy)
        fresh = SimModel(model)
        fresh.quant_layer(model.layers[1].name).weight.mul_(-0.5)
        assert torch.equal(after, fresh(x, policy))
        assert not torch.equal(before, after)


def test_eval_engine_sim_reports_simulator_numbers():
    model = load_model(DIGITS_MODEL)
    dataset = load_dataset(DataConfig(name="digits", limit=100))
    report = evaluate(model, dataset, [load_policy("w4a4")], engine="sim", progress=False)
    assert report.engine == "sim" and report.results[0].method == "simulator" and report.results[0].sim is None
    expected = _ort_logits(quantize(model, load_policy("w4a4").resolve(model.layers)).proto, dataset.x, 1)
    assert abs(report.results[0].accuracy - np.mean(expected.argmax(1) == dataset.y)) <= 0.005


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("per_sample", [False, True])
def test_nonnegative_shortcut_gives_the_general_codes(bits, per_sample):
    """ReLU outputs skip the minimum pass and the clip; the codes must not change (checked against the
    NumPy reference, including an all-zero input and inputs with a single positive value)."""
    rng = np.random.default_rng(bits)
    x = np.maximum(rng.standard_normal((6, 3, 5, 5)).astype(np.float32) * rng.uniform(0.01, 100, (6, 1, 1, 1)), 0)
    x = x.astype(np.float32)
    x[1] = 0.0
    x[2] = 0.0
    x[2, 0, 0, 0] = 3.7
    t = torch.from_numpy(x)
    scale, zp = activation_scale_zero_point(t, bits, per_sample, nonnegative=True)
    fast = centered_activation_codes(t, scale, zp, bits, nonnegative=True)
    general = centered_activation_codes(t, *activation_scale_zero_point(t, bits, per_sample), bits)
    assert torch.equal(fast, general)
    samples = [x[n : n + 1] for n in range(len(x))] if per_sample else [x]
    expected = np.concatenate([ref.quantize_activation(s, bits)[0].astype(np.int64) for s in samples])
    np.testing.assert_array_equal(fast.numpy(), expected)
