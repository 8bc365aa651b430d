"""The kernel-family mitigations (7-bit weights, uint8 weights, ORT's x64 quant-precision session option):
ORT's logits against the simulator's and against the NumPy oracle, on a model where saturation matters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper
from test_cli import run_cli

import numpy_reference as ref
from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.evaluate import make_session, predict
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import KernelOptions, load_policy, parse_policy
from ptqaudit.quantize import ORT_QUANTIZER, REWRITE, X64_QUANT_PRECISION_KEY, quantize
from ptqaudit.search.space import Budget, SearchSpace
from ptqaudit.sim.engine import sim_predict
from ptqaudit.sim.model import SimModel

F32 = np.float32
DIGITS_MODEL = Path(__file__).resolve().parents[1] / "sample_models" / "digits_cnn.onnx"
W8A8 = {"weight_bits": 8, "activation_bits": 8}
W8A8_CHANNEL = {**W8A8, "granularity": "per-channel"}
# policy -> (its file's data, whether its products are exact on every CPU)
POLICIES = {
    "w8a8": ({"default": W8A8}, False),
    "w8a8-u8u8": ({"default": W8A8, "weight_type": "uint8"}, True),
    "w8a8-x64-precision": ({"default": W8A8, "x64_quant_precision": True}, True),
    "w7a8": ({"default": {"weight_bits": 7, "activation_bits": 8}}, True),
    "w8a8-per-channel": ({"default": W8A8_CHANNEL}, False),
    "w8a8-per-channel-u8u8": ({"default": W8A8_CHANNEL, "weight_type": "uint8"}, True),
    "w8a8-per-channel-x64-precision": ({"default": W8A8_CHANNEL, "x64_quant_precision": True}, True),
    "w8a8-both": ({"default": W8A8, "weight_type": "uint8", "x64_quant_precision": True}, True),
}


def _model(tmp_path: Path) -> tuple[Path, dict]:
    """Conv -> Relu -> Flatten -> Gemm(transB) -> Relu -> MatMul -> Add. The Conv's positive weights
    keep its outputs near the top of their range, so the Gemm's 8-bit activation codes mostly lie in
    the upper half of 0..255 and meet full-range weight codes: most int16 pair sums of the u8 x s8
    kernel overflow."""
    rng = np.random.default_rng(5)
    inits = {
        "W1": rng.uniform(0.2, 1, (4, 1, 3, 3)).astype(F32),
        "B1": rng.uniform(0, 1, 4).astype(F32),
        "W2": rng.uniform(-1, 1, (32, 144)).astype(F32),
        "C2": rng.uniform(-1, 1, 32).astype(F32),
        "W3": rng.uniform(-1, 1, (32, 10)).astype(F32),
        "B3": rng.uniform(-1, 1, 10).astype(F32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r1"], name="relu1"),
        helper.make_node("Flatten", ["r1"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W2", "C2"], ["g"], name="fc1", transB=1),
        helper.make_node("Relu", ["g"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "W3"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "B3"], ["y"], name="fc2_bias"),
    ]
    graph = helper.make_graph(nodes, "saturating",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "saturating.onnx"
    onnx.save(model, str(path))
    return path, inits


def _oracle(x: np.ndarray, inits: dict, bits_w: int, per_channel: bool, family: str) -> np.ndarray:
    """The model's logits in NumPy integer arithmetic of one kernel family (the whole x as one batch)."""
    h = ref.conv_layer(x, inits["W1"], inits["B1"], bits_w, 8, per_channel)["y"]
    h = np.maximum(h, F32(0)).reshape(len(x), -1)
    h = ref.gemm_layer(h, inits["W2"], inits["C2"], bits_w, 8, per_channel, trans_b=True, family=family)["y"]
    h = np.maximum(h, F32(0))
    return ref.matmul_layer(h, inits["W3"], inits["B3"], bits_w, 8, per_channel, family)["y"]


@pytest.fixture(scope="module")
def saturating(tmp_path_factory):
    path, inits = _model(tmp_path_factory.mktemp("mitigations"))
    rng = np.random.default_rng(3)  # inputs of four 4x4 blocks, each of one value in 0.3..1
    x = (0.3 + 0.7 * np.kron(rng.uniform(0, 1, (16, 1, 2, 2)), np.ones((1, 1, 4, 4)))).astype(F32)
    return load_model(path), inits, x


def test_the_model_saturates(saturating):
    """Without a mitigation, the u8 x s8 kernel of AVX2 without VNNI changes the logits of this model
    (NumPy oracle of both families, so this holds on any CPU)."""
    _, inits, x = saturating
    for per_channel in (False, True):
        exact = _oracle(x, inits, 8, per_channel, "exact")
        saturated = _oracle(x, inits, 8, per_channel, "avx2-u8s8")
        assert np.mean(saturated != exact) > 0.9
        assert np.abs(saturated - exact).max() > 0.1 * np.abs(exact).max()
        assert np.any(saturated.argmax(1) != exact.argmax(1))  # it changes predictions, not only logits


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_ort_equals_simulator_and_the_oracle(saturating, ort_kernel_family, name):
    """ORT (default session options plus the policy's), the simulator of this machine's family, and the
    NumPy oracle: bitwise the same logits. A mitigated policy matches the exact family's oracle whatever
    the CPU; ORT's default int8 weights match the oracle of this CPU's family."""
    model, inits, x = saturating
    data, exact_everywhere = POLICIES[name]
    policy = parse_policy(data, name, "test").resolve(model.layers)
    assert policy.options.exact_products == (name not in ("w8a8", "w8a8-per-channel", "w7a8"))
    quantized = quantize(model, policy)
    (ort_logits,) = make_session(quantized).run(None, {"x": x})
    with torch.no_grad():
        sim_logits = SimModel(model).eval()(torch.from_numpy(x), policy).numpy()
    family = "exact" if exact_everywhere else ort_kernel_family
    default = policy.mapping["conv"]
    oracle = _oracle(x, inits, default.weight_bits, default.per_channel, family)
    np.testing.assert_array_equal(ort_logits, sim_logits)
    np.testing.assert_array_equal(ort_logits, oracle)


@pytest.mark.parametrize("name", ["w8a8", "w8a8-u8u8", "w8a8-x64-precision", "w7a8"])
def test_builtin_mitigations_are_exact_in_the_saturating_family(saturating, name):
    """The simulator told to emulate AVX2 without VNNI, on any CPU: the built-in mitigations compute the
    exact family's logits, plain w8a8 the saturated ones (against the NumPy oracle of each)."""
    model, inits, x = saturating
    policy = load_policy(name).resolve(model.layers)
    with torch.no_grad():
        logits = SimModel(model, kernel_family="avx2-u8s8").eval()(torch.from_numpy(x), policy).numpy()
    bits = policy.mapping["conv"].weight_bits
    family = "avx2-u8s8" if name == "w8a8" else "exact"
    np.testing.assert_array_equal(logits, _oracle(x, inits, bits, False, family))


def test_shared_simulation_keeps_each_policy_s_kernel(saturating):
    """forward_many shares work between policies with equal layer settings but must not share it across
    kernel options: each result equals the policy simulated alone."""
    model, _, x = saturating
    sim = SimModel(model, kernel_family="avx2-u8s8").eval()
    policies = [load_policy(n).resolve(model.layers) for n in ("w8a8", "w8a8-u8u8", "w8a8-x64-precision", "w8a8")]
    with torch.no_grad():
        together = sim.forward_many(torch.from_numpy(x), policies)
        alone = [sim(torch.from_numpy(x), p) for p in policies]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    assert not torch.equal(together[0], together[1])  # the saturation is there to be told apart


def test_uint8_graph_stores_shifted_codes_with_zero_point_128(saturating):
    """Same codes and scales as the int8 rewrite, shifted by 128 into uint8, one scalar zero point of 128
    (ConvInteger accepts no per-channel weight zero point), for per-channel layers too."""
    model, inits, _ = saturating
    for granularity in ("per-tensor", "per-channel"):
        default = {**W8A8, "granularity": granularity}
        signed = quantize(model, parse_policy({"default": default}, "s8", "t").resolve(model.layers), force_rewrite=True)
        unsigned = quantize(model, parse_policy({"default": default, "weight_type": "uint8"}, "u8", "t").resolve(model.layers))
        assert unsigned.method == REWRITE
        values = {i.name: numpy_helper.to_array(i) for i in unsigned.proto.graph.initializer}
        signed_values = {i.name: numpy_helper.to_array(i) for i in signed.proto.graph.initializer}
        for layer, tensors in unsigned.layer_tensors.items():
            codes = values[tensors["w_codes"]]
            assert codes.dtype == np.uint8
            np.testing.assert_array_equal(codes.astype(np.int16) - 128, signed_values[signed.layer_tensors[layer]["w_codes"]])
            np.testing.assert_array_equal(values[tensors["w_scale"]], signed_values[signed.layer_tensors[layer]["w_scale"]])
        zero_points = [n.input[3] for n in unsigned.proto.graph.node if n.op_type in ("ConvInteger", "MatMulInteger")]
        assert len(zero_points) == 3
        for zp in zero_points:
            assert values[zp].dtype == np.uint8 and values[zp].shape == () and int(values[zp]) == 128
        # against the oracle's own codes: conv weights per output channel (axis 0)
        conv_codes, _ = ref.quantize_weight(inits["W1"], 8, granularity == "per-channel", axis=0)
        np.testing.assert_array_equal(values[unsigned.layer_tensors["conv"]["w_codes"]], conv_codes.astype(np.int16) + 128)


def _config_entry(session, key: str) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # ORT: the session has no such entry
        return None


def test_session_option_is_set_only_for_the_policy_that_asks(saturating):
    model, _, _ = saturating
    for name, expected in (("w8a8", None), ("w8a8-u8u8", None), ("w8a8-x64-precision", "1")):
        quantized = quantize(model, load_policy(name).resolve(model.layers))
        assert quantized.x64_quant_precision == (expected == "1")
        assert _config_entry(make_session(quantized), X64_QUANT_PRECISION_KEY) == expected
        if name == "w8a8-x64-precision":  # the graph is quantize_dynamic's own: the option is the only change
            assert quantized.method == ORT_QUANTIZER
    assert _config_entry(make_session(model.proto), X64_QUANT_PRECISION_KEY) is None


def test_search_space_keeps_the_base_policy_s_kernel_options(saturating):
    """A search from a mitigated base policy scores and writes policies with the same mitigation."""
    model, _, _ = saturating
    base = load_policy("w8a8-u8u8").resolve(model.layers)
    space = SearchSpace(model.layers, base, (4, 8), [layer.name for layer in model.layers], Budget(0))
    policy = space.policy(space.uniform(0))
    assert policy.options == KernelOptions(weight_type="uint8")
    assert policy.digest != SearchSpace(model.layers, load_policy("w8a8").resolve(model.layers), (4, 8),
                                        [layer.name for layer in model.layers], Budget(0)).policy(space.uniform(0)).digest


def test_quantize_command_names_the_session_option(saturating, tmp_path, capsys):
    model, _, _ = saturating
    code, out, _ = run_cli(capsys, "quantize", model.path, "-p", "w8a8-x64-precision", "-o", tmp_path / "q.onnx")
    assert code == 0 and f'{X64_QUANT_PRECISION_KEY} = "1"' in out
    code, out, _ = run_cli(capsys, "quantize", model.path, "-p", "w8a8-x64-precision", "-o", tmp_path / "q.onnx", "--json")
    assert code == 0 and json.loads(out)["session_config"] == {X64_QUANT_PRECISION_KEY: "1"}
    code, out, _ = run_cli(capsys, "quantize", model.path, "-p", "w8a8-u8u8", "-o", tmp_path / "u.onnx")
    assert code == 0 and X64_QUANT_PRECISION_KEY not in out and "uint8 weights" in out
    code, out, _ = run_cli(capsys, "quantize", model.path, "-p", "w8a8-u8u8", "-o", tmp_path / "u.onnx", "--json")
    assert code == 0 and "session_config" not in json.loads(out)


@pytest.mark.parametrize("batch_size", [1, 60])
def test_digits_model_mitigations_give_the_exact_family_s_logits(batch_size):
    """On the sample digits model, whose w8a8 logits this CPU's family may change: each built-in mitigation's
    ORT logits equal the simulator's and those of the exact family's simulation, bit for bit."""
    model = load_model(DIGITS_MODEL)
    dataset = load_dataset(DataConfig(name="digits", limit=240))
    sim, exact = SimModel(model).eval(), SimModel(model, kernel_family="exact").eval()
    for name in ("w8a8-u8u8", "w8a8-x64-precision", "w7a8"):
        policy = load_policy(name).resolve(model.layers)
        ort_logits = predict(make_session(quantize(model, policy)), dataset, batch_size, name, progress=False).logits
        np.testing.assert_array_equal(ort_logits, sim_predict(sim, dataset, policy, batch_size, progress=False).logits)
        np.testing.assert_array_equal(ort_logits, sim_predict(exact, dataset, policy, batch_size, progress=False).logits)
