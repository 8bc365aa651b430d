"""Audits for a fleet of kernel families (--kernels): every family's numbers against a NumPy oracle of its
integer arithmetic (tests/numpy_reference.py), this machine's family against ORT, and the gate on the worst."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from conftest import make_model
from numpy_reference import KERNEL_FAMILIES, matmul_layer
from onnx import TensorProto, helper, numpy_helper
from test_cli import run_cli

K, CLASSES, IMAGES = 16, 4, 120


def _saturating_classifier(tmp_path) -> tuple:
    """A one-MatMul classifier on [N, 1, 1, K] inputs in [0, 1] whose weights reach full-range codes in
    same-signed pairs, so that AVX2's int16 pair sums saturate, and an .npz of inputs labelled by its
    fp32 prediction. Returns (model path, data path, x, w)."""
    rng = np.random.default_rng(3)
    w = rng.uniform(-1, 1, (K, CLASSES)).astype(np.float32)
    w[0:2, 0] = 1.0  # pairs of the largest code: 2 * 255 * 127 passes 32,767
    w[4:8, 1] = 0.9
    x = rng.uniform(0, 1, (IMAGES, 1, 1, K)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["scores"], name="head"),
         helper.make_node("Flatten", ["scores"], ["logits"], name="flatten")],
        "saturating", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 1, K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(w, "w")])
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model_path, data_path = tmp_path / "saturating.onnx", tmp_path / "saturating.npz"
    onnx.save_model(model, str(model_path))
    np.savez(data_path, x=x, y=(x.reshape(IMAGES, K) @ w).argmax(axis=1))
    return model_path, data_path, x, w


def _oracle_accuracy(x: np.ndarray, w: np.ndarray, bits: int, family: str, activation_bits: int = 8) -> float:
    """Accuracy at batch size 1 (each input its own activation range) by NumPy integer arithmetic."""
    labels = (x.reshape(IMAGES, K) @ w).argmax(axis=1)
    predicted = [matmul_layer(x[i].reshape(1, K), w, None, bits, activation_bits, False, family)["y"].argmax()
                 for i in range(IMAGES)]
    return float(np.mean(np.array(predicted) == labels))


@pytest.fixture
def saturating(tmp_path):
    return _saturating_classifier(tmp_path)


def test_the_oracle_families_differ_on_this_model(saturating):
    """The test model is one where the fleet matters: saturation changes its predictions."""
    _, _, x, w = saturating
    assert _oracle_accuracy(x, w, 8, "avx2-u8s8") < _oracle_accuracy(x, w, 8, "exact")


def test_eval_gives_each_family_its_own_arithmetic(saturating, ort_kernel_family, capsys):
    model, data, x, w = saturating
    code, out, _ = run_cli(capsys, "eval", model, "--data", data, "-p", "w8a8", "-p", "w7a8", "--kernels", "all",
                           "--no-progress", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["kernels"] == list(KERNEL_FAMILIES) and report["kernel_family"] == ort_kernel_family
    results = {(r["policy"], r["kernel_family"]): r for r in report["results"]}
    assert len(results) == 4
    for (policy, family), result in results.items():
        bits = int(policy[1])
        assert result["accuracy"] == pytest.approx(_oracle_accuracy(x, w, bits, family)), (policy, family)
        assert result["source"] == ("ORT" if family == ort_kernel_family else "emulated")
    # reduce_range (7-bit weights) is the same under both families: its pair sums stay below 2^15
    assert results["w7a8", "exact"]["accuracy"] == results["w7a8", "avx2-u8s8"]["accuracy"]


def test_eval_table_labels_emulated_numbers(saturating, ort_kernel_family, capsys):
    model, data, _, _ = saturating
    code, out, _ = run_cli(capsys, "eval", model, "--data", data, "-p", "w8a8", "--kernels", "all", "--no-progress")
    assert code == 0
    other = next(f for f in KERNEL_FAMILIES if f != ort_kernel_family)
    assert f"{ort_kernel_family} (ORT)" in out and f"{other} (emulated)" in out
    code, out, _ = run_cli(capsys, "eval", model, "--data", data, "-p", "w8a8", "--no-progress")
    assert code == 0 and "(emulated)" not in out and "kernels " not in out  # one family, this machine's: no column


def test_eval_gate_names_every_failing_policy_and_family(saturating, capsys):
    model, data, x, w = saturating
    drops = {family: 100 * (1 - _oracle_accuracy(x, w, 8, family)) for family in KERNEL_FAMILIES}
    threshold = (drops["exact"] + drops["avx2-u8s8"]) / 2  # between the two families' drops
    code, _, err = run_cli(capsys, "eval", model, "--data", data, "-p", "w8a8", "--kernels", "all", "--no-progress",
                           "--max-drop", f"{threshold:.4f}")
    assert code == 1
    assert "w8a8 on avx2-u8s8 kernels" in err and "w8a8 on exact kernels" not in err
    code, out, _ = run_cli(capsys, "eval", model, "--data", data, "-p", "w8a8", "--kernels", "exact", "--no-progress",
                           "--max-drop", f"{threshold:.4f}")
    assert code == 0 and "gate passed" in out


def test_unknown_family_is_a_usage_error(saturating, capsys):
    model, data, _, _ = saturating
    code, _, err = run_cli(capsys, "eval", model, "--data", data, "--kernels", "avx9")
    assert code == 2 and "unknown kernel family 'avx9'" in err


def _search(capsys, saturating, run, *options) -> str:
    """An exhaustive search of the one-layer model over bits {4, 8}; its standard output."""
    model, data, _, _ = saturating
    code, out, err = run_cli(capsys, "search", model, "--data", data, "--bits", "4,8", "--budget-avg-bits", "4",
                             "--method", "exhaustive", "--no-progress", "-o", run, *options)
    assert code == 0, err
    return out


def test_search_scores_and_verifies_every_family_and_gates_the_worst(saturating, ort_kernel_family, tmp_path, capsys):
    _, _, x, w = saturating
    run = tmp_path / "run"
    out = _search(capsys, saturating, run, "--kernels", "all", "--verify-top", "2")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kernels"] == {f: ("ORT" if f == ort_kernel_family else "emulated") for f in KERNEL_FAMILIES}
    worst = summary["worst"]
    for candidate in worst["candidates"]:
        weight_bits, activation_bits = map(int, re.fullmatch(r"W(\d)A(\d)", candidate["layers"]["head"]).groups())
        for family in KERNEL_FAMILIES:
            assert candidate["kernels"][family] == pytest.approx(
                _oracle_accuracy(x, w, weight_bits, family, activation_bits)), (candidate["layers"], family)
        assert candidate["kernels"][ort_kernel_family] == candidate["ort_accuracy"]
    # the worst case is the fleet's: the lowest accuracy over its families, and its drop is from that
    fleet_worst = min(worst["kernels"].values())
    assert fleet_worst == min(min(c["kernels"].values()) for c in worst["candidates"])
    assert worst["drop_points"] == pytest.approx(100 * (summary["fp32_accuracy"] - fleet_worst))
    assert "avx2-u8s8 (" in out and "exact (" in out


def test_report_starts_with_the_ship_policy_per_family_and_gates_the_fleet(saturating, ort_kernel_family, tmp_path,
                                                                            capsys):
    """A run searched on this machine's family alone, reported for the whole fleet: the families it did not
    measure are measured by the report, each against the NumPy oracle of its arithmetic."""
    _, _, x, w = saturating
    run = tmp_path / "run"
    _search(capsys, saturating, run, "--verify-top", "1", "--objective", "worst")
    code, out, err = run_cli(capsys, "report", run, "--json", "--kernels", "all", "--analysis-limit", "60",
                             "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    ship = report["analysis"]["ship_policy"]
    assert ship["policy"] == "w8a8" and [k["kernel_family"] for k in ship["kernels"]] == list(KERNEL_FAMILIES)
    for row in ship["kernels"]:
        assert row["accuracy"] == pytest.approx(_oracle_accuracy(x, w, 8, row["kernel_family"]))
        assert row["source"] == ("ORT" if row["kernel_family"] == ort_kernel_family else "emulated")
    # each mitigation is the policy under exact products (session option, uint8 weights) or 7-bit weights,
    # on every family; the recommendation is the first of those with the highest lowest accuracy
    expected = {"x64 quant precision (session option)": {f: _oracle_accuracy(x, w, 8, "exact") for f in KERNEL_FAMILIES},
                "uint8 weights": {f: _oracle_accuracy(x, w, 8, "exact") for f in KERNEL_FAMILIES},
                "7-bit weights (reduce_range)": {f: _oracle_accuracy(x, w, 7, f) for f in KERNEL_FAMILIES}}
    measured = {m["change"]: m["kernels"] for m in ship["mitigations"]}
    assert list(measured) == list(expected)
    for change, by_family in expected.items():
        assert measured[change] == pytest.approx(by_family), change
    best = max(expected, key=lambda change: min(expected[change].values()))
    code, markdown, err = run_cli(capsys, "report", run, "--kernels", "all", "--analysis-limit", "60", "--no-progress")
    assert code == 0, err
    assert f"ship w8a8 with {best}" in markdown
    h = report["headline"]
    label = json.loads((run / "summary.json").read_text())["worst"]["policy"]["head"]
    weight_bits, activation_bits = map(int, re.fullmatch(r"W(\d)A(\d)", label).groups())
    for family in KERNEL_FAMILIES:
        assert h["worst_by_kernels"][family] == pytest.approx(
            _oracle_accuracy(x, w, weight_bits, family, activation_bits))
    assert h["worst_accuracy"] == min(h["worst_by_kernels"].values())
    assert markdown.index("## Shipping w8a8") < markdown.index("## Budget search")
    code, _, err = run_cli(capsys, "report", run, "--kernels", "all", "--no-analysis",
                           "--min-accuracy", f"{100 * h['worst_accuracy'] + 0.01:.4f}")
    assert code == 1 and "gate failed" in err
