"""Checks policy parsing, validation, resolution, BitOPs / effective bits (vs hand-computed MACs) and digests."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

from ptqaudit.errors import PtqauditError
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import (
    FILE_KEYS,
    KernelOptions,
    LayerQuant,
    builtin_policy_names,
    load_policy,
    parse_policy,
    policy_file_dict,
)

F32 = np.float32
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
W4A8 = {"weight_bits": 4, "activation_bits": 8}
BUILTINS = ["w2a8", "w4a4", "w4a8", "w4a8-first-last-w8a8", "w7a8", "w8a8", "w8a8-per-channel", "w8a8-u8u8",
            "w8a8-x64-precision"]
README = Path(__file__).resolve().parents[1] / "README.md"


# ---------------------------------------------------------------- a tiny model with hand-computed MACs

X_SHAPE = (1, 3, 6, 6)


def _hand_macs() -> dict[str, int]:
    """MACs per sample, from the shapes in _tiny_model (not from ptqaudit): output elements x products each."""
    # conv1: 3 -> 4 channels, 3x3, pad 1, stride 1: output 4 x 6 x 6, each 3 * 3 * 3 products
    conv1 = 4 * 6 * 6 * (3 * 3 * 3)
    # conv2: 4 -> 6 channels, 3x3, pad 1, stride 2, group 2: output 6 x 3 x 3 ((6 + 2 - 3) // 2 + 1 = 3),
    # each (4 / 2) * 3 * 3 products
    conv2 = 6 * 3 * 3 * (2 * 3 * 3)
    fc1 = 10 * 54  # Gemm transB=1: B is [10, 54], 54 = 6 * 3 * 3 flattened
    fc2 = 5 * 10  # MatMul [10, 5]
    return {"conv1": conv1, "conv2": conv2, "fc1": fc1, "fc2": fc2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Conv -> Relu -> Conv(stride 2, group 2) -> Flatten -> Gemm(transB) -> Relu -> MatMul -> Add."""
    rng = np.random.default_rng(0)
    inits = {
        "W1": rng.standard_normal((4, 3, 3, 3)).astype(F32),
        "B1": rng.standard_normal(4).astype(F32),
        "W2": rng.standard_normal((6, 2, 3, 3)).astype(F32),
        "W3": rng.standard_normal((10, 54)).astype(F32),
        "C3": rng.standard_normal(10).astype(F32),
        "W4": rng.standard_normal((10, 5)).astype(F32),
        "B4": rng.standard_normal(5).astype(F32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", strides=[2, 2], pads=[1, 1, 1, 1], group=2),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3", "C3"], ["g"], name="fc1", transB=1),
        helper.make_node("Relu", ["g"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "W4"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "B4"], ["y"], name="fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *X_SHAPE[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("policy") / "tiny.onnx"
    onnx.save(model, str(path))
    loaded = load_model(path)
    assert [layer.name for layer in loaded.layers] == LAYERS
    assert [layer.op_type for layer in loaded.layers] == ["Conv", "Conv", "Gemm", "MatMul"]
    return loaded


def _resolve(tiny, data, name="p"):
    return parse_policy(data, name, "test").resolve(tiny.layers)


def _settings(resolved) -> dict:
    return {k: (v.weight_bits, v.activation_bits, v.per_channel) if v else None for k, v in resolved.mapping.items()}


def _error(match, fn, *args, **kwargs) -> str:
    with pytest.raises(PtqauditError, match=match) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- files


def test_yaml_file(tiny, tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(
        "# a comment\n"
        "description: mixed test policy\n"
        "default: {weight_bits: 4, activation_bits: 8, granularity: per-channel}\n"
        "layers:\n"
        "  conv1: fp32\n"
        "  fc2: {weight_bits: 2, activation_bits: 3, granularity: per-tensor}\n"
    )
    policy = load_policy(str(path))
    assert policy.name == "mixed" and policy.description == "mixed test policy"
    assert policy.source == str(path)
    assert policy.default == LayerQuant(4, 8, True)
    assert _settings(policy.resolve(tiny.layers)) == {
        "conv1": None, "conv2": (4, 8, True), "fc1": (4, 8, True), "fc2": (2, 3, False),
    }


def test_yml_suffix_is_yaml(tiny, tmp_path):
    path = tmp_path / "p.yml"
    path.write_text("default: {weight_bits: 3, activation_bits: 6}\n")
    assert set(_settings(load_policy(str(path)).resolve(tiny.layers)).values()) == {(3, 6, False)}


def test_json_file(tiny, tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({
        "description": "json policy",
        "default": "fp32",
        "layers": {"@Conv": {"weight_bits": 5, "activation_bits": 7}, "fc1": {"weight_bits": 8, "activation_bits": 8}},
    }))
    policy = load_policy(path)
    assert policy.name == "mixed" and policy.description == "json policy" and policy.default is None
    assert _settings(policy.resolve(tiny.layers)) == {
        "conv1": (5, 7, False), "conv2": (5, 7, False), "fc1": (8, 8, False), "fc2": None,
    }


@pytest.mark.parametrize("suffix,text,kind", [
    (".yaml", "default: {weight_bits: 4, activation_bits: 8\n", "YAML"),
    (".yaml", "default:\n  weight_bits: 4\n activation_bits: 8\n", "YAML"),
    (".yaml", "default: [1, 2\n", "YAML"),
    (".json", '{"default": {"weight_bits": 4, "activation_bits": 8}', "JSON"),
    (".json", "default: {weight_bits: 4, activation_bits: 8}\n", "JSON"),  # YAML in a .json file
    (".json", "", "JSON"),
])
def test_malformed_file(suffix, text, kind, tmp_path):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    message = _error(f"not valid {kind}", load_policy, str(path))
    assert str(path) in message
    assert "\n" not in message  # one clear line


@pytest.mark.parametrize("text", ["", "just a string\n", "- a\n- list\n", "42\n"])
def test_yaml_that_is_not_a_mapping(text, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    _error("expected a mapping", load_policy, str(path))


def test_binary_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(PtqauditError):
        load_policy(str(path))


def test_unknown_policy_name_lists_builtins(tmp_path):
    message = _error("neither a file nor a built-in", load_policy, "w5a5-nonexistent")
    for name in BUILTINS:
        assert name in message
    _error("neither a file nor a built-in", load_policy, str(tmp_path / "missing.yaml"))
    _error("neither a file nor a built-in", load_policy, str(tmp_path))  # a folder


# ---------------------------------------------------------------- built-ins


def test_builtin_names():
    assert builtin_policy_names() == sorted(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtins_load_and_resolve(name, tiny):
    policy = load_policy(name)
    assert policy.name == name and policy.source == "built-in"
    assert policy.description.strip()
    resolved = policy.resolve(tiny.layers)
    assert list(resolved.mapping) == LAYERS
    assert all(q is not None for q in resolved.mapping.values())


EXPECTED_BUILTINS = {
    "w2a8": {name: (2, 8, False) for name in LAYERS},
    "w4a4": {name: (4, 4, False) for name in LAYERS},
    "w4a8": {name: (4, 8, False) for name in LAYERS},
    "w7a8": {name: (7, 8, False) for name in LAYERS},
    "w8a8": {name: (8, 8, False) for name in LAYERS},
    "w8a8-per-channel": {name: (8, 8, True) for name in LAYERS},
    "w8a8-u8u8": {name: (8, 8, False) for name in LAYERS},
    "w8a8-x64-precision": {name: (8, 8, False) for name in LAYERS},
    "w4a8-first-last-w8a8": {"conv1": (8, 8, False), "conv2": (4, 8, False), "fc1": (4, 8, False), "fc2": (8, 8, False)},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_BUILTINS))
def test_builtin_settings(name, tiny):
    assert _settings(load_policy(name).resolve(tiny.layers)) == EXPECTED_BUILTINS[name]


EXPECTED_OPTIONS = {"w8a8-u8u8": ("uint8", False), "w8a8-x64-precision": ("int8", True)}


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_kernel_options(name, tiny):
    """The two mitigation policies carry their option; every other built-in keeps ORT's defaults."""
    resolved = load_policy(name).resolve(tiny.layers)
    options = resolved.options
    assert (options.weight_type, options.x64_quant_precision) == EXPECTED_OPTIONS.get(name, ("int8", False))
    assert options.exact_products == (name in EXPECTED_OPTIONS)


# ---------------------------------------------------------------- validation


def test_unknown_file_key_lists_allowed(tiny):
    message = _error("unknown key", parse_policy, {"default": W4A8, "layer": {}}, "p", "test")
    assert "layer" in message
    for key in ("description", "default", "layers"):
        assert key in message


@pytest.mark.parametrize("where", ["default", "rule"])
def test_unknown_setting_key_lists_allowed(where):
    bad = {"weight_bits": 4, "activation_bits": 8, "bits": 4}
    data = {"default": bad} if where == "default" else {"default": W4A8, "layers": {"conv1": bad}}
    message = _error("unknown key", parse_policy, data, "p", "test")
    assert "bits" in message
    for key in ("weight_bits", "activation_bits", "granularity"):
        assert key in message


def test_unknown_setting_keys_of_mixed_types():
    _error("unknown key", parse_policy, {"default": {1: 4, "foo": 2, "weight_bits": 4, "activation_bits": 8}}, "p", "t")


@pytest.mark.parametrize("key", ["weight_bits", "activation_bits"])
@pytest.mark.parametrize("value", [1, 9, 0, -8, 16, "8", True, False, 8.0, 4.5, None, [8]])
def test_bits_out_of_range_or_wrong_type(key, value):
    bad = dict(W4A8, **{key: value})
    message = _error(key, parse_policy, {"default": bad}, "p", "test")
    assert "2" in message and "8" in message  # states the accepted range
    _error(key, parse_policy, {"default": W4A8, "layers": {"conv1": {key: value}}}, "p", "test")
    with pytest.raises(PtqauditError):
        LayerQuant(**dict(W4A8, **{key: value}))


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bit_width_in_range_is_accepted(bits, tiny):
    resolved = _resolve(tiny, {"default": {"weight_bits": bits, "activation_bits": bits}})
    assert set(_settings(resolved).values()) == {(bits, bits, False)}


@pytest.mark.parametrize("granularity", ["per_channel", "channel", "Per-Channel", "per-layer", "", None, True])
def test_bad_granularity(granularity):
    message = _error("granularity", parse_policy, {"default": dict(W4A8, granularity=granularity)}, "p", "test")
    assert "per-tensor" in message and "per-channel" in message


@pytest.mark.parametrize("setting", ["int8", "fp16", 8, None, ["weight_bits", 4]])
def test_setting_neither_fp32_nor_mapping(setting):
    _error("fp32", parse_policy, {"default": setting}, "p", "test")
    _error("fp32", parse_policy, {"default": W4A8, "layers": {"conv1": setting}}, "p", "test")


@pytest.mark.parametrize("data,match", [
    ({"description": "no default"}, "default"),
    ({"default": W4A8, "layers": ["conv1"]}, "layers"),
    ({"default": W4A8, "description": 3}, "description"),
    ({"default": W4A8, "layers": {"@middle": "fp32"}}, "selector"),
    ({"default": W4A8, "layers": {"@Relu": "fp32"}}, "selector"),
    ({"default": W4A8, "layers": {1: "fp32"}}, "selector"),
    ({"default": {"weight_bits": 4}}, "activation_bits"),
    ([W4A8], "mapping"),
    (None, "mapping"),
])
def test_malformed_policy(data, match):
    _error(match, parse_policy, data, "p", "test")


def test_selector_matching_no_layer_names_closest(tiny):
    policy = parse_policy({"default": W4A8, "layers": {"conv3": "fp32"}}, "p", "test")  # valid until resolved
    message = _error("matches no layer", policy.resolve, tiny.layers)
    assert "conv3" in message and "conv1" in message and "conv2" in message
    message = _error("matches no layer", _resolve, tiny, {"default": W4A8, "layers": {"fc_1": "fp32"}})
    assert "fc1" in message
    _error("matches no layer", _resolve, tiny, {"default": W4A8, "layers": {"dense*": "fp32"}})


def test_op_selector_matching_no_layer(tmp_path):
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="only")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(rng.standard_normal((4, 3)).astype(F32), "W")],
    )
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    loaded = load_model(tmp_path / "m.onnx")
    # a kind the model lacks selects nothing (one policy serves image and text models); a name must match
    for selector in ("@Conv", "@Gemm", "@embedding", "@attention"):
        assert _settings(_resolve(loaded, {"default": W4A8, "layers": {selector: "fp32"}})) == {"only": (4, 8, False)}
    _error("matches no layer", _resolve, loaded, {"default": W4A8, "layers": {"conv*": "fp32"}})
    # on a one-layer model @first and @last are that layer
    resolved = _resolve(loaded, {"default": W4A8, "layers": {"@first": {"weight_bits": 2}, "@last": {"activation_bits": 3}}})
    assert _settings(resolved) == {"only": (4, 3, False)}


# ---------------------------------------------------------------- selectors and rule order


@pytest.mark.parametrize("selector,selected", [
    ("conv1", {"conv1"}),
    ("conv*", {"conv1", "conv2"}),
    ("fc?", {"fc1", "fc2"}),
    ("*", set(LAYERS)),
    ("*1", {"conv1", "fc1"}),
    ("[cf]*2", {"conv2", "fc2"}),
    ("@first", {"conv1"}),
    ("@last", {"fc2"}),
    ("@Conv", {"conv1", "conv2"}),
    ("@Gemm", {"fc1"}),
    ("@MatMul", {"fc2"}),
])
def test_selectors(selector, selected, tiny):
    resolved = _resolve(tiny, {"default": W4A8, "layers": {selector: "fp32"}})
    assert {name for name, q in resolved.mapping.items() if q is None} == selected
    assert all(q == LayerQuant(4, 8) for name, q in resolved.mapping.items() if name not in selected)


def test_glob_is_case_sensitive(tiny):
    _error("matches no layer", _resolve, tiny, {"default": W4A8, "layers": {"CONV*": "fp32"}})


def test_later_rule_wins(tiny):
    w2, w6 = {"weight_bits": 2, "activation_bits": 8}, {"weight_bits": 6, "activation_bits": 8}
    forward = _resolve(tiny, {"default": W4A8, "layers": {"conv*": w2, "conv2": w6}})
    assert _settings(forward)["conv1"] == (2, 8, False) and _settings(forward)["conv2"] == (6, 8, False)
    backward = _resolve(tiny, {"default": W4A8, "layers": {"conv2": w6, "conv*": w2}})
    assert _settings(backward)["conv2"] == (2, 8, False)
    # fp32 then re-quantized, and quantized then fp32
    assert _settings(_resolve(tiny, {"default": W4A8, "layers": {"@Conv": "fp32", "@first": w6}}))["conv1"] == (6, 8, False)
    assert _settings(_resolve(tiny, {"default": W4A8, "layers": {"@first": w6, "*": "FP32"}}))["conv1"] is None


def test_partial_rule_merges_onto_default(tiny):
    default = {"weight_bits": 4, "activation_bits": 8, "granularity": "per-channel"}
    resolved = _resolve(tiny, {"default": default, "layers": {
        "conv1": {"activation_bits": 6},
        "conv2": {"weight_bits": 3},
        "fc1": {"granularity": "per-tensor"},
    }})
    assert _settings(resolved) == {
        "conv1": (4, 6, True), "conv2": (3, 8, True), "fc1": (4, 8, False), "fc2": (4, 8, True),
    }


def test_partial_rule_merges_onto_default_not_onto_earlier_rules(tiny):
    """Documented semantics: each rule is merged onto the default, so later rules do not stack."""
    resolved = _resolve(tiny, {"default": W4A8, "layers": {"*": {"weight_bits": 2}, "@first": {"activation_bits": 5}}})
    assert _settings(resolved)["conv1"] == (4, 5, False)
    assert _settings(resolved)["conv2"] == (2, 8, False)


def test_granularity_defaults_to_per_tensor(tiny):
    assert _settings(_resolve(tiny, {"default": W4A8}))["conv1"] == (4, 8, False)


@pytest.mark.parametrize("rule", [{"weight_bits": 4}, {"activation_bits": 8}, {"granularity": "per-channel"}, {}])
def test_fp32_default_with_partial_rule_is_an_error(rule):
    message = _error("missing", parse_policy, {"default": "fp32", "layers": {"conv1": rule}}, "p", "test")
    assert "fp32" in message


def test_fp32_default_with_full_rule(tiny):
    resolved = _resolve(tiny, {"default": "fp32", "layers": {"fc1": {"weight_bits": 3, "activation_bits": 4}}})
    assert _settings(resolved) == {"conv1": None, "conv2": None, "fc1": (3, 4, False), "fc2": None}
    assert set(resolved.quantized) == {"fc1"}


# ---------------------------------------------------------------- BitOPs and effective bits


def test_layer_macs_match_hand_computation(tiny):
    assert {layer.name: layer.macs for layer in tiny.layers} == _hand_macs()


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_policy_has_b_effective_bits(bits, tiny):
    resolved = _resolve(tiny, {"default": {"weight_bits": bits, "activation_bits": bits}})
    assert resolved.bitops(tiny.layers) == sum(_hand_macs().values()) * bits * bits
    assert math.isclose(resolved.effective_bits(tiny.layers), bits, rel_tol=1e-12)


def test_w4a8_effective_bits(tiny):
    resolved = load_policy("w4a8").resolve(tiny.layers)
    assert resolved.bitops(tiny.layers) == 32 * sum(_hand_macs().values())
    assert math.isclose(resolved.effective_bits(tiny.layers), math.sqrt(32), rel_tol=1e-12)
    assert round(resolved.effective_bits(tiny.layers), 3) == 5.657


def test_all_fp32_counts_32_bits(tiny):
    resolved = _resolve(tiny, {"default": "fp32"})
    assert resolved.bitops(tiny.layers) == 32 * 32 * sum(_hand_macs().values())
    assert math.isclose(resolved.effective_bits(tiny.layers), 32.0, rel_tol=1e-12)


def test_mixed_bitops_and_effective_bits(tiny):
    resolved = _resolve(tiny, {"default": W4A8, "layers": {
        "conv1": "fp32", "conv2": {"weight_bits": 2, "activation_bits": 3}, "fc2": {"weight_bits": 8, "granularity": "per-channel"},
    }})
    macs = _hand_macs()
    expected = macs["conv1"] * 32 * 32 + macs["conv2"] * 2 * 3 + macs["fc1"] * 4 * 8 + macs["fc2"] * 8 * 8
    assert resolved.bitops(tiny.layers) == expected
    assert math.isclose(resolved.effective_bits(tiny.layers), math.sqrt(expected / sum(macs.values())), rel_tol=1e-12)
    # granularity does not change the cost
    per_tensor = _resolve(tiny, {"default": W4A8, "layers": {
        "conv1": "fp32", "conv2": {"weight_bits": 2, "activation_bits": 3}, "fc2": {"weight_bits": 8},
    }})
    assert per_tensor.bitops(tiny.layers) == expected


def test_first_last_w8a8_effective_bits(tiny):
    resolved = load_policy("w4a8-first-last-w8a8").resolve(tiny.layers)
    macs = _hand_macs()
    expected = (macs["conv1"] + macs["fc2"]) * 64 + (macs["conv2"] + macs["fc1"]) * 32
    assert resolved.bitops(tiny.layers) == expected
    assert math.sqrt(32) < resolved.effective_bits(tiny.layers) < 8


# ---------------------------------------------------------------- digest, summary, round trip


def test_digest_equal_for_equal_settings(tiny):
    a = load_policy("w4a8-first-last-w8a8").resolve(tiny.layers)
    b = _resolve(tiny, {"default": {"weight_bits": 8, "activation_bits": 8}, "layers": {
        "conv2": W4A8, "fc1": dict(W4A8, granularity="per-tensor")}}, name="another-name")
    assert a.mapping == b.mapping
    assert a.digest == b.digest
    assert len(a.digest) == 12 and all(c in "0123456789abcdef" for c in a.digest)
    assert load_policy("w8a8").resolve(tiny.layers).digest == _resolve(tiny, {"default": {"weight_bits": 8, "activation_bits": 8}}).digest


@pytest.mark.parametrize("change", [
    {"conv1": {"weight_bits": 5}},
    {"fc2": {"activation_bits": 7}},
    {"fc1": {"granularity": "per-channel"}},
    {"conv2": "fp32"},
])
def test_digest_differs_for_different_settings(change, tiny):
    base = _resolve(tiny, {"default": W4A8})
    changed = _resolve(tiny, {"default": W4A8, "layers": change})
    assert base.digest != changed.digest


def test_digests_of_builtins_are_distinct(tiny):
    digests = {name: load_policy(name).resolve(tiny.layers).digest for name in BUILTINS}
    assert len(set(digests.values())) == len(BUILTINS), digests


def test_summary(tiny):
    assert load_policy("w4a8").resolve(tiny.layers).summary() == "W4A8 x4"
    mixed = load_policy("w4a8-first-last-w8a8").resolve(tiny.layers).summary()
    assert sorted(mixed.split(", ")) == ["W4A8 x2", "W8A8 x2"]
    assert load_policy("w8a8-per-channel").resolve(tiny.layers).summary() == "W8A8/ch x4"
    assert _resolve(tiny, {"default": "fp32"}).summary() == "fp32 x4"


def test_policy_file_round_trip(tiny, tmp_path):
    resolved = _resolve(tiny, {"default": W4A8, "layers": {
        "conv1": "fp32", "conv2": {"weight_bits": 2, "granularity": "per-channel"}, "@last": {"activation_bits": 5}}})
    data = policy_file_dict(resolved, "round trip")
    path = tmp_path / "explicit.yaml"
    path.write_text(yaml.safe_dump(data))
    again = load_policy(str(path)).resolve(tiny.layers)
    assert again.mapping == resolved.mapping and again.digest == resolved.digest
    path = tmp_path / "explicit.json"
    path.write_text(json.dumps(data))
    assert load_policy(str(path)).resolve(tiny.layers).digest == resolved.digest


# ---------------------------------------------------------------- kernel options (policy-wide mitigations)


def test_kernel_options_default_to_onnx_runtime_s(tiny):
    policy = parse_policy({"default": W4A8}, "p", "test")
    assert policy.options == KernelOptions() == KernelOptions("int8", False)
    assert policy.resolve(tiny.layers).options == KernelOptions()
    assert not KernelOptions().exact_products


@pytest.mark.parametrize("weight_type,precision", [("int8", False), ("uint8", False), ("int8", True), ("uint8", True)])
def test_kernel_options_are_read(tiny, tmp_path, weight_type, precision):
    path = tmp_path / "opts.yaml"
    path.write_text(f"default: {{weight_bits: 8, activation_bits: 8}}\nweight_type: {weight_type}\n"
                    f"x64_quant_precision: {str(precision).lower()}\n")
    resolved = load_policy(str(path)).resolve(tiny.layers)
    assert resolved.options == KernelOptions(weight_type, precision)
    assert resolved.options.exact_products == (weight_type == "uint8" or precision)
    assert _settings(resolved) == {name: (8, 8, False) for name in LAYERS}  # the layers' settings are untouched


@pytest.mark.parametrize("value", ["int4", "UINT8", "u8", "", 8, None, True, ["uint8"], {"type": "uint8"}])
def test_bad_weight_type_is_refused(value):
    message = _error("weight_type", parse_policy, {"default": W4A8, "weight_type": value}, "p", "test")
    assert "int8" in message and "uint8" in message  # states what is accepted
    with pytest.raises(PtqauditError, match="weight_type"):
        KernelOptions(weight_type=value)


@pytest.mark.parametrize("value", ["1", "true", 1, 0, None, "yes please", [True], {"on": True}])
def test_bad_x64_quant_precision_is_refused(value):
    """Only a YAML / JSON boolean: the policy selects one session option, it never passes ORT a value."""
    message = _error("x64_quant_precision", parse_policy, {"default": W4A8, "x64_quant_precision": value}, "p", "test")
    assert "true or false" in message
    with pytest.raises(PtqauditError, match="x64_quant_precision"):
        KernelOptions(x64_quant_precision=value)


@pytest.mark.parametrize("key,value", [("weight_type", "uint8"), ("x64_quant_precision", True)])
def test_kernel_options_are_policy_wide(key, value):
    """Per layer they are refused, with a message that says where they belong."""
    message = _error("unknown key", parse_policy, {"default": W4A8, "layers": {"conv1": {key: value}}}, "p", "test")
    assert key in message and "policy-wide" in message
    _error("unknown key", parse_policy, {"default": dict(W4A8, **{key: value})}, "p", "test")


@pytest.mark.parametrize("text", [
    "default: {weight_bits: 8, activation_bits: 8}\nweight_type: uint8\nweight_type: int8\n",  # a key twice
    "default: {weight_bits: 8, activation_bits: 8}\nx64_quant_precision: &on true\nweight_type: *on\n",  # an alias
])
def test_kernel_options_go_through_the_bounded_parser(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PtqauditError, match="twice|aliases"):
        load_policy(str(path))


def test_kernel_options_change_the_digest_and_defaults_keep_the_old_one(tiny):
    plain = _resolve(tiny, {"default": W4A8})
    explicit_defaults = _resolve(tiny, {"default": W4A8, "weight_type": "int8", "x64_quant_precision": False})
    # the digest run folders and caches were keyed by before kernel options existed: the per-layer settings alone
    old = hashlib.sha256(json.dumps({name: {"weight_bits": 4, "activation_bits": 8, "granularity": "per-tensor"}
                                     for name in LAYERS}, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]
    assert plain.digest == explicit_defaults.digest == old
    digests = {plain.digest}
    for options in ({"weight_type": "uint8"}, {"x64_quant_precision": True},
                    {"weight_type": "uint8", "x64_quant_precision": True}):
        digests.add(_resolve(tiny, {"default": W4A8, **options}).digest)
    assert len(digests) == 4


def test_kernel_options_shown_in_summary(tiny):
    assert load_policy("w8a8-u8u8").resolve(tiny.layers).summary() == "W8A8 x4; uint8 weights"
    assert load_policy("w8a8-x64-precision").resolve(tiny.layers).summary() == "W8A8 x4; x64 quant precision"
    assert load_policy("w8a8").resolve(tiny.layers).summary() == "W8A8 x4"


@pytest.mark.parametrize("options", [{"weight_type": "uint8"}, {"x64_quant_precision": True},
                                     {"weight_type": "uint8", "x64_quant_precision": True}])
def test_kernel_options_round_trip_through_policy_files(tiny, tmp_path, options):
    resolved = _resolve(tiny, {"default": W4A8, "layers": {"conv1": "fp32"}, **options})
    data = policy_file_dict(resolved, "round trip")
    assert {k: data[k] for k in options} == options
    for path, text in ((tmp_path / "p.yaml", yaml.safe_dump(data)), (tmp_path / "p.json", json.dumps(data))):
        path.write_text(text)
        again = load_policy(str(path)).resolve(tiny.layers)
        assert again.options == resolved.options and again.digest == resolved.digest
    # a policy at the defaults writes no option keys: its file reads the same in older versions
    assert set(policy_file_dict(_resolve(tiny, {"default": W4A8}), "plain")) == {"description", "default", "layers"}


def test_readme_documents_every_policy_file_key():
    text = README.read_text()
    section = text[text.index("## Policies"):text.index("## What \"quantized\" means here")]
    for key in FILE_KEYS:
        assert f"{key}:" in section, f"README's policy-file section does not document {key!r}"
    for name in BUILTINS:
        assert f"`{name}`" in section, f"README's built-in policy table does not list {name!r}"


def test_layer_setting_labels_read_back_to_the_same_setting():
    for setting in (LayerQuant(4, 8), LayerQuant(8, 8, True), LayerQuant(2, 3)):
        assert LayerQuant.from_label(setting.label) == setting
    assert LayerQuant.from_label("fp32") is None
    with pytest.raises(PtqauditError, match="not a layer setting label"):
        LayerQuant.from_label("w4a8")


# ---------------------------------------------------------------- hostile policy files


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """'Billion laughs' in a few hundred bytes: each anchor lists the previous one `width` times, so the
    last stands for width ** levels strings."""
    anchors = ["&l0 [" + ", ".join(['"lol"'] * width) + "]"]
    anchors += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "default: [" + ", ".join(anchors) + "]\n"


def _shared_bomb(levels: int = 9, width: int = 9) -> list:
    """What the alias bomb stands for, built in memory: width ** levels strings, sharing their lists."""
    value = ["lol" * 100] * width
    for _ in range(levels - 1):
        value = [value] * width
    return value


@pytest.mark.parametrize("place", ["default", "layer rule"])
def test_yaml_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path, place):
    import time

    text = _alias_bomb()
    assert len(text) < 700
    path = tmp_path / "bomb.yaml"
    path.write_text(text if place == "default" else "default: fp32\nlayers:\n  conv1:" + text[len("default:"):])
    started = time.perf_counter()
    message = _error("alias", load_policy, str(path))
    assert time.perf_counter() - started < 5
    assert str(path) in message and len(message) < 300 and "\n" not in message


@pytest.mark.parametrize("data", [
    {"default": _shared_bomb()},
    {"default": {"weight_bits": _shared_bomb(), "activation_bits": 8}},
    {"default": {"weight_bits": 8, "activation_bits": 8, "granularity": _shared_bomb()}},
    {"default": {"weight_bits": 8, "activation_bits": 8}, "layers": {"conv1": _shared_bomb()}},
    {"default": "fp32", "layers": {"@" + "x" * 100_000: "fp32"}},
    {"default": "fp32", "layers": {"x\n" * 100_000: "fp32"}},
    {"default": "fp32", "x" * 100_000: 1},
    {"default": {"weight_bits": 8, "activation_bits": 8, "y" * 100_000: 1}},
])
def test_values_quoted_in_errors_are_cut_short(data):
    """However large a value (here up to 9^9 strings sharing lists), an error quotes a few dozen characters."""
    with pytest.raises(PtqauditError) as info:
        parse_policy(data, "p", "test")
    assert len(str(info.value)) < 300 and "\n" not in str(info.value)


DEPTH = 100_000


@pytest.mark.parametrize("suffix,text", [
    (".json", "[" * DEPTH + "]" * DEPTH),
    (".json", '{"":' * (DEPTH // 2) + "1" + "}" * (DEPTH // 2)),  # half as deep: the file stays under the size cap
    (".yaml", "[" * DEPTH + "]" * DEPTH),
    (".yaml", "{a: " * (DEPTH // 2) + "1" + "}" * (DEPTH // 2)),
    (".yaml", "default:\n" + "".join(" " * i + "- \n" for i in range(1, 200))),  # block style
])
def test_deep_nesting_is_refused(tmp_path, suffix, text):
    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    message = _error("nested deeper than", load_policy, str(path))
    assert str(path) in message and len(message) < 300


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_nesting_limit_sits_just_above_what_a_policy_needs(tmp_path, suffix):
    """A list written for a number in a rule (4 levels) still gets the message naming the field; 5 levels do not."""
    def write(bits):
        data = {"default": W4A8, "layers": {"conv1": {"weight_bits": bits, "activation_bits": 8}}}
        path = tmp_path / f"p{suffix}"
        path.write_text(json.dumps(data))  # JSON is YAML too
        return str(path)

    _error("weight_bits must be an integer", load_policy, write([8]))
    _error("nested deeper than 4 levels", load_policy, write([[8]]))


DUPLICATES = {  # where the key repeats: (the repeated key, JSON text, YAML text, line of the repeat in the YAML)
    "top level": ("default", '{"default": "fp32", "description": "d", "default": {"weight_bits": 8, "activation_bits": 8}}',
                  "default: fp32\ndescription: d\ndefault: {weight_bits: 8, activation_bits: 8}\n", 3),
    "layers": ("conv1", '{"default": "fp32", "layers": {"conv1": "fp32", "fc1": "fp32", "conv1": '
                        '{"weight_bits": 4, "activation_bits": 8}}}',
               "default: fp32\nlayers:\n  conv1: fp32\n  fc1: fp32\n  conv1: {weight_bits: 4, activation_bits: 8}\n", 5),
    "setting": ("weight_bits", '{"default": {"weight_bits": 8, "activation_bits": 8, "weight_bits": 2}}',
                "default:\n  weight_bits: 8\n  activation_bits: 8\n  weight_bits: 2\n", 4),
}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("where", sorted(DUPLICATES))
def test_duplicate_keys_are_an_error_naming_key_and_file(tmp_path, suffix, where):
    key, json_text, yaml_text, line = DUPLICATES[where]
    path = tmp_path / f"dup{suffix}"
    path.write_text(json_text if suffix == ".json" else yaml_text)
    message = _error("appears twice", load_policy, str(path))
    assert f"'{key}'" in message and str(path) in message
    if suffix == ".yaml":
        assert f"(line {line})" in message


def test_yaml_keys_equal_as_values_are_duplicates_and_merge_keys_are_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("default: {weight_bits: 8, activation_bits: 8}\nlayers: {conv1: fp32}\n'default': fp32\n")
    _error("'default' appears twice", load_policy, str(path))
    path.write_text("default: {<<: {weight_bits: 4}, weight_bits: 8, activation_bits: 8}\n")  # << would hide one
    _error("merge keys", load_policy, str(path))


def test_policy_file_size_is_capped_before_parsing(tmp_path, tiny):
    from ptqaudit.policy import MAX_FILE_BYTES

    body = json.dumps({"default": W4A8})
    path = tmp_path / "padded.json"
    path.write_text(body + " " * (MAX_FILE_BYTES - len(body)))  # exactly at the cap: accepted
    assert load_policy(str(path)).default == LayerQuant(4, 8)
    path = tmp_path / "huge.yaml"
    path.write_text("default: fp32\n" + "#" * MAX_FILE_BYTES)
    message = _error("larger than 256 KiB", load_policy, str(path))
    assert str(path) in message


def test_long_selectors_are_refused():
    from ptqaudit.policy import MAX_SELECTOR_CHARS

    parse_policy({"default": "fp32", "layers": {"c" * MAX_SELECTOR_CHARS: "fp32"}}, "p", "test")
    message = _error("at most 256", parse_policy, {"default": "fp32", "layers": {"[" * 100_000: "fp32"}}, "p", "test")
    assert "100,000 characters" in message


@pytest.mark.parametrize("name,text", [
    ("bomb.yaml", _alias_bomb()),
    ("deep.json", "[" * DEPTH + "]" * DEPTH),
    ("deep.yaml", "{a: " * (DEPTH // 2) + "}" * (DEPTH // 2)),
    ("dup.json", DUPLICATES["layers"][1]),
])
def test_cli_hostile_policy_is_bad_input(tmp_path, capsys, tiny_digits_model, name, text):
    from ptqaudit import cli

    policy = tmp_path / name
    policy.write_text(text)
    out = tmp_path / "out.onnx"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", str(tiny_digits_model), "-p", str(policy), "-o", str(out)])
    _, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptqaudit: error:") and str(policy) in lines[0], err
    assert len(lines[0]) < 300 and not out.exists()
