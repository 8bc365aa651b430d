"""Tests for the `ptqaudit` command line: exit codes, one-line errors, nothing half-written, and the
numbers every command prints, checked against independent computations (ONNX Runtime run here, shapes
multiplied out here, the policy YAML files read here)."""

import itertools
import json
import math
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import ptqaudit
from conftest import TINY_OPSET, build_tiny_digits_model, make_model
from reference_cases import ort_labels
from ptqaudit import cli
from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.onnx_graph import load_model

REPO = Path(__file__).resolve().parents[1]
POLICY_DIR = REPO / "ptqaudit" / "policies"
CONV_MACS = 4 * 8 * 8 * 1 * 3 * 3  # Cout*H*W * Cin*kh*kw
FC_MACS = 256 * 10  # K*N
RNG_SEED = 7


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """No user cache, no $PTQAUDIT_DATA, no debug switch leaking into a test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("PTQAUDIT_DATA", raising=False)
    monkeypatch.delenv("PTQAUDIT_DEBUG", raising=False)


# --- running the CLI ---------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """ptqaudit.cli.main in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), out, err


def run_subprocess(*argv, env_update: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PTQAUDIT_DEBUG", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_update or {})
    return subprocess.run([sys.executable, "-m", "ptqaudit", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def assert_bad_input(code: int, err: str, *phrases: str) -> str:
    """Exit code 2, exactly one non-empty stderr line starting 'ptqaudit: error:' containing every
    phrase (a regex, case-insensitive), and no traceback. Returns the line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ptqaudit: error:"), err
    for phrase in phrases:
        assert re.search(phrase, lines[0], re.IGNORECASE), f"{phrase!r} not in {lines[0]!r}"
    assert code == 2, (code, err)
    return lines[0]


def assert_empty_dir(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [], "left behind in the output folder"


# --- small models for the error cases --------------------------------------------------------------------


def vinfo(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def save_model(tmp_path: Path, name: str, nodes, inputs, outputs, initializers=()) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    proto = make_model(graph, opset_imports=[helper.make_opsetid("", TINY_OPSET)])
    onnx.checker.check_model(proto)
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(proto, str(path))
    return path


def weight(name, shape, seed=RNG_SEED):
    return numpy_helper.from_array(np.random.default_rng(seed).normal(size=shape).astype(np.float32), name)


@pytest.fixture
def relu_flatten_model(tmp_path) -> Path:
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["logits"], name="flatten")]
    return save_model(tmp_path, "relu_flatten", nodes, [vinfo("input", ["batch", 1, 8, 8])], [vinfo("logits", ["batch", 64])])


@pytest.fixture
def activation_matmul_model(tmp_path) -> Path:
    """A MatMul of two activations (x @ x^T): nothing with a constant weight."""
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="flatten"),
             helper.make_node("Transpose", ["f"], ["ft"], name="transpose"),
             helper.make_node("MatMul", ["f", "ft"], ["logits"], name="gram")]
    return save_model(tmp_path, "gram", nodes, [vinfo("input", ["batch", 1, 8, 8])], [vinfo("logits", ["batch", "batch"])])


def conv_only_model(tmp_path, declare_output_shape=True) -> Path:
    nodes = [helper.make_node("Conv", ["input", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    # undeclared: the graph claims [batch, classes] (symbolic), but the Conv really returns [batch, 1, 8, 8]
    output = vinfo("y", ["batch", 1, 8, 8] if declare_output_shape else ["batch", "classes"])
    return save_model(tmp_path, "conv_only" + ("" if declare_output_shape else "_undeclared"), nodes,
                      [vinfo("input", ["batch", 1, 8, 8])], [output], [weight("w", (1, 1, 3, 3))])


@pytest.fixture
def cifar_shaped_model(tmp_path) -> Path:
    """input [batch,3,32,32] -> Conv -> GlobalAveragePool -> Flatten -> Gemm -> [batch,10]."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w"], ["logits"], name="fc")]
    return save_model(tmp_path, "cifar_shaped", nodes, [vinfo("input", ["batch", 3, 32, 32])], [vinfo("logits", ["batch", 10])],
                      [weight("w", (4, 3, 3, 3)), weight("fc_w", (4, 10))])


def five_class_model(tmp_path) -> Path:
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w"], ["logits"], name="fc")]
    return save_model(tmp_path, "five_class", nodes, [vinfo("input", ["batch", 1, 8, 8])], [vinfo("logits", ["batch", 5])],
                      [weight("fc_w", (64, 5))])


def fixed_batch_model(tmp_path) -> Path:
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w"], ["logits"], name="fc")]
    return save_model(tmp_path, "fixed_batch", nodes, [vinfo("input", [1, 1, 8, 8])], [vinfo("logits", [1, 10])],
                      [weight("fc_w", (64, 10))])


def write_policy(tmp_path: Path, text: str, name: str = "custom.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- independent references ---------------------------------------------------------------------------------


def builtin_policy_yaml() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted(POLICY_DIR.glob("*.yaml"))}


def expected_bits(policy: dict, n_layers: int) -> list[tuple[int, int]]:
    """(weight bits, activation bits) per layer for the selector forms the built-ins use."""
    default = policy["default"]
    bits = [dict(default) for _ in range(n_layers)]
    for selector, setting in (policy.get("layers") or {}).items():
        if selector in ("@embedding", "@attention"):
            continue  # kinds an image model has none of
        assert selector in ("@first", "@last"), f"extend this test for selector {selector!r}"
        index = 0 if selector == "@first" else n_layers - 1
        bits[index].update(setting)
    return [(b["weight_bits"], b["activation_bits"]) for b in bits]


# ============================================================================================================
# bad input: exit code 2, one line, no traceback, nothing written
# ============================================================================================================


@pytest.mark.parametrize("command", ["layers", "quantize", "eval", "policies"])
def test_missing_model_file(capsys, tmp_path, command):
    missing = tmp_path / "nope.onnx"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = {
        "layers": ["layers", missing],
        "quantize": ["quantize", missing, "--policy", "w8a8", "-o", out_dir / "q.onnx"],
        "eval": ["eval", missing, "--limit", "10", "--policy", "w8a8", "--no-progress"],
        "policies": ["policies", "--model", missing],
    }[command]
    code, out, err = run_cli(capsys, *argv)
    assert_bad_input(code, err, "model file not found", re.escape(str(missing)))
    assert out == ""
    assert_empty_dir(out_dir)


def test_missing_model_file_subprocess(tmp_path):
    result = run_subprocess("layers", tmp_path / "nope.onnx")
    assert_bad_input(result.returncode, result.stderr, "model file not found")
    assert result.stdout == ""


@pytest.mark.parametrize("content", ["random", "text", "empty"])
def test_non_onnx_file(capsys, tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes({
        "random": np.random.default_rng(RNG_SEED).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text": b"this is not an ONNX model\njust some text\n",
        "empty": b"",
    }[content])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run_cli(capsys, "quantize", path, "-p", "w8a8", "-o", out_dir / "q.onnx")
    assert_bad_input(code, err, r"not a (readable|valid) ONNX model", re.escape(str(path)))
    assert_empty_dir(out_dir)


def test_non_onnx_file_subprocess(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(np.random.default_rng(RNG_SEED).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_subprocess("quantize", path, "-p", "w8a8", "-o", out_dir / "q.onnx")
    assert_bad_input(result.returncode, result.stderr, r"not a (readable|valid) ONNX model")
    assert_empty_dir(out_dir)


def test_truncated_onnx_file(capsys, tmp_path, tiny_digits_model):
    data = tiny_digits_model.read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv in (["layers", path], ["quantize", path, "-p", "w4a4", "-o", out_dir / "q.onnx"],
                 ["eval", path, "--limit", "10", "-p", "w8a8", "--no-progress"]):
        code, _, err = run_cli(capsys, *argv)
        assert_bad_input(code, err, r"not a (readable|valid) ONNX model", re.escape(str(path)))
    assert_empty_dir(out_dir)


def test_directory_as_model_is_a_usage_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "layers", tmp_path)
    assert code == 2 and "Traceback" not in err and "directory" in err.lower()


@pytest.mark.parametrize("fixture", ["relu_flatten_model", "activation_matmul_model"])
def test_model_without_quantizable_layer(capsys, request, tmp_path, fixture):
    path = request.getfixturevalue(fixture)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv in (["layers", path], ["quantize", path, "-p", "w8a8", "-o", out_dir / "q.onnx"],
                 ["eval", path, "--limit", "10", "-p", "w8a8", "--no-progress"]):
        code, _, err = run_cli(capsys, *argv)
        assert_bad_input(code, err, "no quantizable layer")
    assert_empty_dir(out_dir)


def test_matmul_of_two_graph_inputs_is_refused(capsys, tmp_path):
    """x @ w with both as graph inputs: not an image classifier with constant weights."""
    nodes = [helper.make_node("MatMul", ["input", "w"], ["logits"], name="mm")]
    path = save_model(tmp_path, "two_inputs", nodes, [vinfo("input", ["batch", 64]), vinfo("w", [64, 10])],
                      [vinfo("logits", ["batch", 10])])
    code, _, err = run_cli(capsys, "layers", path)
    assert_bad_input(code, err, "expected one float32 image input.* found 2", "input \\(float\\)", "w \\(float\\)")


def test_float16_input_is_refused(capsys, tmp_path):
    nodes = [helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w"], ["logits"], name="fc")]
    path = save_model(tmp_path, "half_input", nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["batch", 1, 8, 8])],
                      [vinfo("logits", ["batch", 10])], [weight("fc_w", (64, 10))])
    code, _, err = run_cli(capsys, "layers", path)
    assert_bad_input(code, err, "expected one float32 image input", r"input \(float16\)")


def test_non_classifier_output(capsys, tmp_path):
    path = conv_only_model(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv in (["layers", path], ["quantize", path, "-p", "w8a8", "-o", out_dir / "q.onnx"],
                 ["eval", path, "--limit", "10", "-p", "w8a8", "--no-progress"]):
        code, _, err = run_cli(capsys, *argv)
        assert_bad_input(code, err, "not a classifier", r"\[batch, classes\]", r"1, 8, 8")
    assert_empty_dir(out_dir)


def test_non_classifier_output_found_at_run_time(capsys, tmp_path):
    """A graph whose declared output shape is wrong: found when ONNX Runtime returns [N, 1, 8, 8]."""
    path = conv_only_model(tmp_path, declare_output_shape=False)
    code, _, err = run_cli(capsys, "eval", path, "--limit", "10", "-p", "w8a8", "--no-progress", "--json")
    assert_bad_input(code, err, "not a classifier", r"\[10, 1, 8, 8\]")


def test_input_shape_does_not_match_data(capsys, cifar_shaped_model):
    code, out, err = run_cli(capsys, "eval", cifar_shaped_model, "--data", "digits", "--limit", "10",
                             "-p", "w8a8", "--no-progress", "--json")
    assert_bad_input(code, err, re.escape("[batch, 3, 32, 32]"), re.escape("[N, 1, 8, 8]"))
    assert out == ""


def test_more_classes_in_data_than_model_outputs(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", five_class_model(tmp_path), "--limit", "10", "-p", "w8a8", "--no-progress", "--json")
    assert_bad_input(code, err, "10 classes", "5 scores")


def test_fixed_batch_dimension_must_match_batch_size(capsys, tmp_path):
    path = fixed_batch_model(tmp_path)
    code, _, err = run_cli(capsys, "eval", path, "--limit", "10", "-p", "w8a8", "-b", "4", "--no-progress", "--json")
    assert_bad_input(code, err, "fixed batch size of 1", "--batch-size 1")
    code, out, _ = run_cli(capsys, "eval", path, "--limit", "10", "-p", "w8a8", "-b", "1", "--no-progress", "--json")
    assert code == 0 and json.loads(out)["batch_size"] == 1


@pytest.mark.parametrize("argv, phrase", [
    (["--batch-size", "0"], "'--batch-size' / '-b': 0 is not in the range x>=1"),
    (["--limit", "0"], "'--limit': 0 is not in the range x>=1"),
    (["--split", "train", "--mean", "0.5,0.5"], "--mean has 2 values"),
    (["--data", "no_such_dataset"], "not a known dataset"),
])
def test_bad_eval_settings(capsys, tiny_digits_model, argv, phrase):
    code, out, err = run_cli(capsys, "eval", tiny_digits_model, "-p", "w8a8", "--no-progress", "--json", *argv)
    assert_bad_input(code, err, re.escape(phrase))
    assert out == ""


def test_missing_cifar10_subprocess(tmp_path, tiny_digits_model):
    """--data-root, $PTQAUDIT_DATA and $XDG_CACHE_HOME all point at empty folders."""
    places = {name: tmp_path / name for name in ("root", "env", "xdg")}
    for place in places.values():
        place.mkdir()
    result = run_subprocess("eval", tiny_digits_model, "--data", "cifar10", "--data-root", places["root"], "-p", "w8a8",
                            "--no-progress", env_update={"PTQAUDIT_DATA": str(places["env"]), "XDG_CACHE_HOME": str(places["xdg"])})
    line = assert_bad_input(result.returncode, result.stderr, "CIFAR-10 not found", "--download")
    for place in (places["root"], places["env"], places["xdg"] / "ptqaudit"):
        assert str(place) in line
    assert not (places["xdg"] / "ptqaudit").exists()  # nothing downloaded or created


def test_empty_image_folder(capsys, tmp_path, tiny_digits_model):
    folder = tmp_path / "images"
    folder.mkdir()
    code, _, err = run_cli(capsys, "eval", tiny_digits_model, "--data", folder, "-p", "w8a8", "--no-progress")
    assert_bad_input(code, err, "no class sub-folders", re.escape(str(folder)))
    (folder / "zero").mkdir()
    code, _, err = run_cli(capsys, "eval", tiny_digits_model, "--data", folder, "-p", "w8a8", "--no-progress")
    assert_bad_input(code, err, "no .png, .jpg or .jpeg images", "zero")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_in_folder(capsys, tmp_path, tiny_digits_model, damage):
    folder = tmp_path / "images"
    for label in ("0", "1"):
        (folder / label).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 100 * int(label), np.uint8)).save(folder / label / "good.png")
    bad = folder / "1" / "bad.png"
    if damage == "garbage":
        bad.write_bytes(b"definitely not a PNG")
    else:
        Image.fromarray(np.random.default_rng(RNG_SEED).integers(0, 256, (8, 8), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:-30])
    code, _, err = run_cli(capsys, "eval", tiny_digits_model, "--data", folder, "-p", "w8a8", "--no-progress")
    assert_bad_input(code, err, "cannot read image", re.escape(str(bad)))


POLICY_ERRORS = {
    "bad_yaml": ("default: {weight_bits: 8, activation_bits: 8\n", [r"not valid YAML"]),
    "unknown_key": ("default: {weight_bits: 8, activation_bits: 8}\nlayer: {conv: fp32}\n",
                    [r"unknown key\(s\) layer", "allowed: description, default, layers"]),
    "unknown_setting_key": ("default: {weight_bits: 8, activation_bits: 8, bits: 4}\n", [r"unknown key\(s\) bits"]),
    "bits_9": ("default: {weight_bits: 9, activation_bits: 8}\n", ["weight_bits must be an integer from 2 to 8, got 9"]),
    "bits_1_in_rule": ("default: {weight_bits: 8, activation_bits: 8}\nlayers: {conv: {activation_bits: 1}}\n",
                       ["activation_bits must be an integer from 2 to 8, got 1", "conv"]),
    "granularity": ("default: {weight_bits: 8, activation_bits: 8, granularity: per-row}\n",
                    ["granularity must be one of per-tensor, per-channel"]),
    "no_default": ("description: nothing\n", ["missing key 'default'"]),
    "not_a_mapping": ("- 8\n- 8\n", ["expected a mapping"]),
    "bad_selector": ("default: fp32\nlayers: {'@middle': {weight_bits: 8, activation_bits: 8}}\n",
                     ["bad layer selector '@middle'", "@first"]),
    "rule_matches_nothing": ("default: {weight_bits: 8, activation_bits: 8}\nlayers: {convv: fp32, fc: fp32}\n",
                             ["'convv' matches no layer", "closest layer names: conv"]),
}


@pytest.mark.parametrize("case", sorted(POLICY_ERRORS))
def test_malformed_policy_file(capsys, tmp_path, tiny_digits_model, case):
    text, phrases = POLICY_ERRORS[case]
    policy = write_policy(tmp_path, text)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = run_cli(capsys, "quantize", tiny_digits_model, "-p", policy, "-o", out_dir / "q.onnx")
    assert_bad_input(code, err, *phrases)
    assert out == ""
    assert_empty_dir(out_dir)
    code, out, err = run_cli(capsys, "eval", tiny_digits_model, "--limit", "10", "-p", "w8a8", "-p", policy,
                             "--no-progress", "--json")
    assert_bad_input(code, err, *phrases)
    assert out == ""


def test_malformed_json_policy_and_unknown_policy_name(capsys, tmp_path, tiny_digits_model):
    policy = write_policy(tmp_path, '{"default": {"weight_bits": 8,', name="broken.json")
    code, _, err = run_cli(capsys, "quantize", tiny_digits_model, "-p", policy, "-o", tmp_path / "q.onnx")
    assert_bad_input(code, err, "not valid JSON")
    code, _, err = run_cli(capsys, "quantize", tiny_digits_model, "-p", "w9a9", "-o", tmp_path / "q.onnx")
    line = assert_bad_input(code, err, "'w9a9' is neither a file nor a built-in policy")
    for name in builtin_policy_yaml():
        assert name in line
    assert not (tmp_path / "q.onnx").exists()


def test_usage_errors_are_one_line_exit_2(capsys, tiny_digits_model, tmp_path):
    for argv in (["quantize", tiny_digits_model, "-o", tmp_path / "q.onnx"],  # --policy missing
                 ["eval", tiny_digits_model, "--mean", "a,b"],
                 ["eval", tiny_digits_model, "--batch-size", "two"],
                 ["no-such-command"],
                 ["quantize", tiny_digits_model, "-p", "w8a8", "-o", tmp_path]):  # output is a folder
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ptqaudit: error:") and "--help" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_debug_shows_the_traceback_subprocess(tmp_path):
    result = run_subprocess("layers", tmp_path / "nope.onnx", "--debug")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "PtqauditError" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("ptqaudit: error: model file not found")


def test_debug_from_the_environment(capsys, monkeypatch, relu_flatten_model):
    monkeypatch.setenv("PTQAUDIT_DEBUG", "1")
    code, _, err = run_cli(capsys, "layers", relu_flatten_model)
    assert code == 2 and "Traceback" in err and "no quantizable layer" in err


# --- quantize: nothing half-written ---------------------------------------------------------------------


def test_quantize_into_a_path_under_a_file_is_bad_input(capsys, tmp_path, tiny_digits_model):
    """-o blocker/q.onnx where blocker is a file: the output cannot be written. That is bad input (2)
    with one line naming the path, not an internal error (3)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    code, _, err = run_cli(capsys, "quantize", tiny_digits_model, "-p", "w8a8", "-o", blocker / "q.onnx")
    assert_bad_input(code, err, re.escape(str(blocker)))
    assert blocker.read_text() == "a file, not a folder"


def test_quantize_failing_mid_write_leaves_no_temp_file(capsys, tmp_path, tiny_digits_model, monkeypatch):
    """Serialisation can fail after the temporary file exists (protobuf refuses models over 2 GiB;
    a full disk fails the write): the temporary file must be removed and nothing left behind."""
    from ptqaudit.quantize import QuantizedModel

    class TooLargeProto:
        def SerializeToString(self):
            raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")

    monkeypatch.setattr(cli, "quantize", lambda model, policy: QuantizedModel(TooLargeProto(), "fake"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run_cli(capsys, "quantize", tiny_digits_model, "-p", "w8a8", "-o", out_dir / "q.onnx")
    assert code != 0 and "Traceback" not in err
    assert_empty_dir(out_dir)


# --- external data ----------------------------------------------------------------------------------------


def model_with_external_location(tmp_path: Path, location: str) -> Path:
    """The tiny model with fc_w stored as external data at `location` (written without the data)."""
    proto = build_tiny_digits_model()
    tensor = next(t for t in proto.graph.initializer if t.name == "fc_w")
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(256 * 10 * 4))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    path = folder / "escaping.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture
def external_data_reads(monkeypatch) -> list[str]:
    """Every external-data file onnx opens (its one gateway to the files) in this test."""
    reads = []
    real = onnx.external_data_helper._open_external_data_fd

    def spy(base_dir, location, tensor_name, read_only):
        reads.append(os.path.join(base_dir, location))
        return real(base_dir, location, tensor_name, read_only)

    monkeypatch.setattr(onnx.external_data_helper, "_open_external_data_fd", spy)
    return reads


@pytest.mark.parametrize("secret_exists", [False, True])
def test_external_data_outside_the_model_folder_is_refused(capsys, tmp_path, external_data_reads, secret_exists):
    secret = tmp_path / "secret.bin"
    if secret_exists:
        secret.write_bytes(np.arange(2560, dtype=np.float32).tobytes())
        secret.chmod(0)  # unreadable for non-root users; the spy covers root
    path = model_with_external_location(tmp_path, "../secret.bin")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv in (["layers", path], ["quantize", path, "-p", "w8a8", "-o", out_dir / "q.onnx"],
                 ["eval", path, "--limit", "10", "-p", "w8a8", "--no-progress"]):
        code, _, err = run_cli(capsys, *argv)
        assert_bad_input(code, err, "refusing", "outside", re.escape("'../secret.bin'"))
    assert external_data_reads == []
    assert_empty_dir(out_dir)
    if secret_exists:
        assert stat.S_IMODE(secret.stat().st_mode) == 0


def test_external_data_absolute_location_is_refused(capsys, tmp_path, external_data_reads):
    path = model_with_external_location(tmp_path, "/etc/passwd")
    code, _, err = run_cli(capsys, "layers", path)
    assert_bad_input(code, err, "refusing", "outside")
    assert external_data_reads == []


def test_external_data_missing_file_inside_the_folder(capsys, tmp_path):
    path = model_with_external_location(tmp_path, "weights_gone.bin")
    code, _, err = run_cli(capsys, "layers", path)
    assert_bad_input(code, err, "missing external data file", "weights_gone.bin")


def test_external_data_in_the_model_folder_loads(capsys, tmp_path, external_data_reads):
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "tiny_ext.onnx"
    onnx.save_model(build_tiny_digits_model(), str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    assert (folder / "weights.bin").stat().st_size > 256 * 10 * 4
    code, out, err = run_cli(capsys, "layers", path, "--json")
    assert code == 0, err
    assert [layer["macs"] for layer in json.loads(out)["layers"]] == [CONV_MACS, FC_MACS]
    assert any(read.endswith("weights.bin") for read in external_data_reads)  # the spy does see reads
    q = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "quantize", path, "-p", "w4a8", "-o", q)
    assert code == 0, err
    x = load_dataset(DataConfig(name="digits", limit=5)).x
    assert ort_labels(q, x, 5).shape == (5,)


# ============================================================================================================
# happy paths
# ============================================================================================================


def test_version_subprocess():
    result = run_subprocess("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ptqaudit, version {ptqaudit.__version__}"


def test_help_lists_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("layers", "policies", "quantize", "eval"):
        assert command in out


def test_layers_table(capsys, tiny_digits_model):
    code, out, err = run_cli(capsys, "layers", tiny_digits_model)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["#", "layer", "kind", "weight", "output", "MACs", "params"]
    assert rows[2] == ["0", "conv", "@Conv", "4x1x3x3", "batchx4x8x8", f"{CONV_MACS:,}", f"{4 * 9 + 4:,}"]
    assert rows[3] == ["1", "fc", "@Gemm", "256x10", "batchx10", f"{FC_MACS:,}", f"{2560 + 10:,}"]
    assert f"2 quantizable layers, {CONV_MACS + FC_MACS:,} MACs per input" in out


@pytest.mark.parametrize("fixture, head", [("tiny_digits_model", "Gemm"), ("tiny_matmul_model", "MatMul")])
def test_layers_json(capsys, request, fixture, head):
    path = request.getfixturevalue(fixture)
    code, out, err = run_cli(capsys, "layers", path, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == str(path)
    # MACs from shapes alone: Conv Cout*H*W*Cin*kh*kw (pad 1 keeps 8x8), Gemm/MatMul K*N
    cout, cin, kh, kw, h, w = 4, 1, 3, 3, 8, 8
    assert report["layers"] == [
        {"index": 0, "name": "conv", "op_type": "Conv", "kind": "Conv", "weight_shape": [cout, cin, kh, kw],
         "output_shape": ["batch", cout, h, w], "macs": cout * h * w * cin * kh * kw, "params": cout * cin * kh * kw + cout},
        {"index": 1, "name": "fc", "op_type": head, "kind": head, "weight_shape": [256, 10], "output_shape": ["batch", 10],
         "macs": 256 * 10, "params": 256 * 10 + (10 if head == "Gemm" else 0)},
    ]
    assert report["total_macs"] == cout * h * w * cin * kh * kw + 256 * 10


def test_layers_json_subprocess(tiny_digits_model):
    result = run_subprocess("layers", tiny_digits_model, "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert json.loads(result.stdout)["total_macs"] == CONV_MACS + FC_MACS


def test_policies_lists_every_builtin(capsys):
    expected = builtin_policy_yaml()
    code, out, err = run_cli(capsys, "policies", "--json")
    assert code == 0, err
    entries = json.loads(out)
    assert [e["name"] for e in entries] == sorted(expected)
    assert {e["name"]: e["description"] for e in entries} == {n: p["description"] for n, p in expected.items()}
    code, out, _ = run_cli(capsys, "policies")
    assert code == 0
    table_names = [line.split()[0] for line in out.splitlines()[2:] if line.strip()]
    assert table_names == sorted(expected)


def test_policies_with_model_costs(capsys, tiny_digits_model):
    code, out, err = run_cli(capsys, "policies", "--model", tiny_digits_model, "--json")
    assert code == 0, err
    entries = {e["name"]: e for e in json.loads(out)}
    macs = [CONV_MACS, FC_MACS]
    for name, policy in builtin_policy_yaml().items():
        bits = expected_bits(policy, len(macs))
        bitops = sum(m * w * a for m, (w, a) in zip(macs, bits))
        assert entries[name]["effective_bits"] == pytest.approx(math.sqrt(bitops / sum(macs)), rel=1e-12), name
    assert entries["w4a8"]["effective_bits"] == pytest.approx(math.sqrt(32))
    assert entries["w8a8-per-channel"]["layers"] == "W8A8/ch x2"
    code, out, _ = run_cli(capsys, "policies", "--model", tiny_digits_model)
    assert code == 0 and "5.66" in out and "eff. bits" in out


@pytest.mark.parametrize("policy, method, layers, bits", [
    ("w8a8", "onnxruntime.quantize_dynamic", "W8A8 x2", (8, 8)),
    ("w4a4", "ptqaudit-rewrite", "W4A4 x2", (4, 4)),
    ("w8a8-per-channel", "ptqaudit-rewrite", "W8A8/ch x2", (8, 8)),
])
def test_quantize_writes_a_model_onnxruntime_runs(capsys, tmp_path, tiny_digits_model, policy, method, layers, bits):
    out_dir = tmp_path / "out" / "nested"  # created on demand
    output = out_dir / "q.onnx"
    code, out, err = run_cli(capsys, "quantize", tiny_digits_model, "--policy", policy, "-o", output, "--json")
    assert code == 0, err
    info = json.loads(out)
    w, a = bits
    assert info == {
        "output": str(output), "policy": policy, "method": method, "layers": layers,
        "effective_bits": pytest.approx(math.sqrt(w * a)), "bitops": (CONV_MACS + FC_MACS) * w * a,
        "bytes": output.stat().st_size,
    }
    assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx"]  # no temporary file left
    proto = onnx.load(str(output))
    onnx.checker.check_model(proto)
    ops = {node.op_type for node in proto.graph.node}
    assert {"ConvInteger", "MatMulInteger"} <= ops
    assert not ops & {"Conv", "Gemm", "MatMul"}  # every layer really runs on integer kernels
    x = load_dataset(DataConfig(name="digits", limit=7)).x
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x})
    assert logits.shape == (7, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("policy", ["w8a8", "w4a8"])
def test_quantize_gemm_with_transposed_weight(capsys, tmp_path, policy):
    """Gemm transB=1 (weight [N, K], as PyTorch exports Linear): quantized on both paths, and the
    quantized model's predictions stay close to FP32 at 8 bits."""
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    path = save_model(tmp_path, "transb", nodes, [vinfo("input", ["batch", 1, 8, 8])], [vinfo("logits", ["batch", 10])],
                      [weight("fc_w", (10, 64)), weight("fc_b", (10,))])
    code, out, err = run_cli(capsys, "layers", path, "--json")
    assert code == 0 and json.loads(out)["layers"][0]["macs"] == 64 * 10
    output = tmp_path / "q.onnx"
    code, out, err = run_cli(capsys, "quantize", path, "-p", policy, "-o", output, "--json")
    assert code == 0, err
    ops = {node.op_type for node in onnx.load(str(output)).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops
    x = load_dataset(DataConfig(name="digits", limit=40)).x
    agree = np.mean(ort_labels(output, x, 40) == ort_labels(path, x, 40))
    assert agree >= (0.9 if policy == "w8a8" else 0.5)


def test_quantize_text_output_and_overwrite(capsys, tmp_path, tiny_matmul_model):
    output = tmp_path / "q.onnx"
    output.write_bytes(b"old content")
    code, out, err = run_cli(capsys, "quantize", tiny_matmul_model, "-p", "w4a8", "-o", output)
    assert code == 0, err
    assert out.startswith(f"wrote {output}") and "w4a8" in out and "5.66 effective bits" in out
    onnx.checker.check_model(onnx.load(str(output)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "q.onnx"]


@pytest.fixture(scope="module")
def digits50():
    return load_dataset(DataConfig(name="digits", limit=50))


@pytest.mark.parametrize("fixture", ["tiny_digits_model", "tiny_matmul_model"])
def test_eval_json_matches_onnxruntime_run_here(capsys, request, tmp_path, digits50, fixture):
    model = request.getfixturevalue(fixture)
    policies = ["w8a8", "w4a4"]
    argv = ["eval", model, "--data", "digits", "--limit", "50", "--json", "--no-progress"]
    for p in policies:
        argv += ["--policy", p]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    report = json.loads(out)
    assert report["batch_size"] == 1
    assert report["images"] == 50 and report["dataset"] == "digits/test"
    assert [r["policy"] for r in report["results"]] == policies

    x, y = digits50.x, digits50.y
    fp32_labels = ort_labels(model, x, 1)
    fp32 = float(np.mean(fp32_labels == y))
    assert report["fp32_accuracy"] == pytest.approx(fp32, abs=1e-12)
    assert fp32 > 0.5  # the fitted tiny model is a real classifier
    for result, policy in zip(report["results"], policies):
        quantized = tmp_path / f"{policy}.onnx"
        code, _, err = run_cli(capsys, "quantize", model, "-p", policy, "-o", quantized)
        assert code == 0, err
        labels = ort_labels(quantized, x, 1)
        acc = float(np.mean(labels == y))
        assert result["accuracy"] == pytest.approx(acc, abs=1e-12), policy
        assert result["drop_points"] == pytest.approx(100 * (fp32 - acc), abs=1e-9), policy
        assert result["agreement_with_fp32"] == pytest.approx(float(np.mean(labels == fp32_labels)), abs=1e-12)
        assert result["effective_bits"] == pytest.approx({"w8a8": 8.0, "w4a4": 4.0}[policy])
        assert result["bitops"] == (CONV_MACS + FC_MACS) * {"w8a8": 64, "w4a4": 16}[policy]


def test_eval_reports_the_batch_size_used(capsys, tmp_path, tiny_digits_model, digits50):
    """The activation range is taken over the whole batch, so batch size 50 may change accuracy; the
    JSON must say which batch size produced the numbers, and they must be ORT's at that batch size."""
    quantized = tmp_path / "w4a4.onnx"
    assert run_cli(capsys, "quantize", tiny_digits_model, "-p", "w4a4", "-o", quantized)[0] == 0
    results = {}
    for batch_size in (1, 50):
        code, out, err = run_cli(capsys, "eval", tiny_digits_model, "--limit", "50", "-p", "w4a4", "--batch-size",
                                 batch_size, "--json", "--no-progress")
        assert code == 0, err
        report = json.loads(out)
        assert report["batch_size"] == batch_size
        results[batch_size] = report["results"][0]["accuracy"]
        acc = float(np.mean(ort_labels(quantized, digits50.x, batch_size) == digits50.y))
        assert results[batch_size] == pytest.approx(acc, abs=1e-12), batch_size
    # batch size 1 twice gives the same numbers
    code, out, _ = run_cli(capsys, "eval", tiny_digits_model, "--limit", "50", "-p", "w4a4", "--json", "--no-progress")
    assert json.loads(out)["results"][0]["accuracy"] == results[1]


def test_eval_text_output_states_the_batch_size(capsys, tiny_digits_model):
    code, out, err = run_cli(capsys, "eval", tiny_digits_model, "--limit", "20", "-p", "w8a8", "-p", "w4a4",
                             "-b", "7", "--no-progress")
    assert code == 0, err
    assert "batch size 7" in out.splitlines()[0]
    assert "20 images" in out.splitlines()[0]
    lines = out.splitlines()
    assert lines[2].split()[:2] == ["policy", "accuracy"] and set(lines[3].replace(" ", "")) == {"-"}
    body = [line.split()[0] for line in lines[4:] if line.strip()]
    assert body[:3] == ["fp32", "w8a8", "w4a4"]
    # the printed accuracy and drop are the JSON numbers for the same run settings
    code, json_out, _ = run_cli(capsys, "eval", tiny_digits_model, "--limit", "20", "-p", "w8a8", "-p", "w4a4",
                                "-b", "7", "--no-progress", "--json")
    report = json.loads(json_out)
    assert report["batch_size"] == 7
    rows = {line.split()[0]: line.split() for line in lines[4:] if line.strip()}
    assert rows["fp32"][1] == f"{100 * report['fp32_accuracy']:.2f}%"
    for result in report["results"]:
        row = rows[result["policy"]]
        assert row[1:3] == [f"{100 * result['accuracy']:.2f}%", f"{result['drop_points']:+.2f}"]
        assert f"{result['effective_bits']:.2f}" in row
    code, out, _ = run_cli(capsys, "eval", tiny_digits_model, "--limit", "20", "-p", "w8a8", "--no-progress")
    assert "batch size 1" in out.splitlines()[0]


def test_eval_end_to_end_subprocess(tiny_digits_model):
    result = run_subprocess("eval", tiny_digits_model, "--limit", "30", "-p", "w8a8", "-b", "10", "--json", "--no-progress")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["batch_size"] == 10 and report["images"] == 30
    assert 0 <= report["results"][0]["accuracy"] <= 1


# ============================================================================================================
# What a new user meets: progress off a terminal, -V, an example in every --help, no output over an input
# ============================================================================================================


def _admitted_policies(model_path: Path, bits: tuple[int, ...], budget_avg_bits: float) -> int:
    """Policies (weight and activation bits per layer) costing at least the budget, counted here."""
    layers = load_model(str(model_path)).layers
    total = sum(layer.macs for layer in layers)
    floor = math.ceil(budget_avg_bits ** 2 * total)
    return sum(sum(layer.macs * w * a for layer, (w, a) in zip(layers, zip(c[::2], c[1::2]))) >= floor
               for c in itertools.product(bits, repeat=2 * len(layers)))


def test_search_off_a_terminal_prints_header_stages_and_progress_lines(tmp_path, tiny_digits_model):
    """stdout and stderr are pipes here (no terminal), merged as a CI log shows them."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PTQAUDIT_PROGRESS_PERIOD="0")
    env.pop("PTQAUDIT_DEBUG", None)
    argv = ["search", tiny_digits_model, "--objective", "worst", "--method", "exhaustive", "--bits", "2,8",
            "--budget-avg-bits", "5", "--limit", "60", "--search-limit", "60", "--verify-top", "2",
            "-o", tmp_path / "run"]
    result = subprocess.run([sys.executable, "-m", "ptqaudit", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout
    log = result.stdout.splitlines()

    def first(pattern: str) -> int:
        return next(i for i, line in enumerate(log) if re.match(pattern, line))

    header = first(r"model \S*tiny\.onnx \| data digits/test, 60 images .*\| budget 5\.00 effective bits")
    searching = first(r"searching the worst case: exhaustive, every policy the budget admits")
    # the uniform policy on the budget's edge is verified beside the 2 leading candidates unless it is one of them
    fp32, verifying = first(r"measuring fp32 on ORT \(60 images\)"), first(r"verifying [23] worst-case candidates on ORT")
    table = first(r"\s+ORT accuracy\s+drop")
    search_lines = [re.match(r"exhaustive search, worst case: (\d+)/(\d+) policy \(\d+%\), elapsed \d+s", line)
                    for line in log]
    search_lines = [(i, int(m[1]), int(m[2])) for i, m in enumerate(search_lines) if m]
    admitted = _admitted_policies(tiny_digits_model, (2, 8), 5.0)
    assert 0 < admitted < 16
    assert search_lines and all(total == admitted for _, _, total in search_lines)  # the bar has its total
    assert search_lines[-1][1] == admitted
    assert header < fp32 < searching < search_lines[0][0] and search_lines[-1][0] < verifying < table
    # each candidate on ORT and on the simulator
    verify_lines = [i for i, line in enumerate(log) if re.match(r"verify worst: \d+/[46] evaluation", line)]
    assert verify_lines and verifying < verify_lines[0]


def test_no_progress_hides_progress_lines_but_keeps_stage_lines(capsys, tmp_path, tiny_digits_model, monkeypatch):
    monkeypatch.setenv("PTQAUDIT_PROGRESS_PERIOD", "0")
    code, out, err = run_cli(capsys, "search", tiny_digits_model, "--objective", "worst", "--method", "exhaustive",
                             "--bits", "2,8", "--budget-avg-bits", "5", "--limit", "40", "--search-limit", "40",
                             "--verify-top", "1", "--no-progress", "-o", tmp_path / "run")
    assert code == 0 and err == ""
    assert "searching the worst case" in out and re.search(r"verifying [12] worst-case candidates? on ORT", out)
    code, out, err = run_cli(capsys, "search", tiny_digits_model, "--objective", "worst", "--method", "exhaustive",
                             "--bits", "2,8", "--budget-avg-bits", "5", "--limit", "40", "--search-limit", "40",
                             "--verify-top", "1", "--json", "-o", tmp_path / "run2")
    assert code == 0 and json.loads(out)["worst"]["evaluations"] > 0  # --json: stdout stays pure JSON
    assert "searching the worst case" in err and re.search(r"exhaustive search, worst case: \d+/\d+ policy", err)


def test_short_version_option(capsys):
    code, short, _ = run_cli(capsys, "-V")
    assert code == 0 and short == f"ptqaudit, version {ptqaudit.__version__}\n"
    assert run_cli(capsys, "--version")[1] == short


def _help_examples(capsys, *command: str) -> list[list[str]]:
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0 and "Example" in out, out
    block = out[out.index("Example"):].split("\n\n")[1]
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines()]


@pytest.mark.parametrize("name", sorted(cli.cli.commands))
def test_every_command_help_shows_an_example_that_parses(capsys, name):
    examples = _help_examples(capsys, name)
    assert examples
    for argv in examples:
        assert argv[:2] == ["ptqaudit", name], argv
        cli.cli.commands[name].make_context(name, argv[2:])  # raises a UsageError on an unknown option or value


def test_group_help_shows_the_audit_example(capsys):
    examples = _help_examples(capsys)
    assert [argv[1] for argv in examples] == ["search", "report"]
    for argv in examples:
        cli.cli.commands[argv[1]].make_context(argv[1], argv[2:])


def test_quantize_refuses_to_write_over_its_inputs(capsys, tmp_path, tiny_digits_model, monkeypatch):
    model = Path(tiny_digits_model)
    before = model.read_bytes()
    monkeypatch.chdir(model.parent)
    (tmp_path / "link.onnx").symlink_to(model)
    policy = tmp_path / "mine.yaml"
    policy.write_text("default: {weight_bits: 4, activation_bits: 8}\n")
    policy_text = policy.read_text()
    for output in ("tiny.onnx", "./tiny.onnx", str(model), "../models/tiny.onnx", str(tmp_path / "link.onnx")):
        code, out, err = run_cli(capsys, "quantize", "tiny.onnx", "-p", "w4a8", "-o", output)
        assert_bad_input(code, err, re.escape(f"output {output} "), r"input tiny\.onnx", "--force")
        assert model.read_bytes() == before
    code, out, err = run_cli(capsys, "quantize", "tiny.onnx", "-p", policy, "-o", policy)
    assert_bad_input(code, err, re.escape(str(policy)), "--force")
    assert policy.read_text() == policy_text
    code, out, err = run_cli(capsys, "quantize", "tiny.onnx", "-p", "w4a8", "-o", "tiny.onnx", "--force")
    assert code == 0, err
    assert "MatMulInteger" in {node.op_type for node in onnx.load("tiny.onnx").graph.node}  # replaced, as asked
