"""Transformers fused by ONNX Runtime's transformer optimizer (--optimize): QAttention and QEmbedLayerNormalization
layers against quantize_dynamic and ORT, the simulator against ORT at every width, and the CLI end to end."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from onnxruntime.quantization import QuantType, quantize_dynamic

from ptqaudit.evaluate import make_session
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import load_policy
from ptqaudit.quantize import quantize
from ptqaudit.sim.model import SimModel
from test_cli import run_cli
from test_lstm import every_width

BERT = Path(__file__).resolve().parents[1] / "sample_models" / "sst2_bert.onnx"
LENGTH = 16


@pytest.fixture(scope="module")
def fused_bert():
    return load_model(BERT, (LENGTH,), optimize="bert")


def _feed(batch: int, seed: int = 0, padded: bool = True) -> dict[str, np.ndarray]:
    """Token ids with the second half of every other sentence padded away (mask 0, id 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 6000, (batch, LENGTH)).astype(np.int64)
    mask = np.ones_like(ids)
    if padded:
        mask[1::2, LENGTH // 2:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_optimized_model_has_fused_layers_and_token_limits(fused_bert):
    """The optimizer fuses the sample BERT fully; its Attention and EmbedLayerNormalization nodes are layers, and
    the fused embedding's tables still bound the token ids and the length."""
    kinds = [layer.kind.selector for layer in fused_bert.layers]
    assert kinds.count("fused-attention") == 2 and kinds.count("fused-embedding") == 1
    assert fused_bert.unaudited == []
    limits = fused_bert.token_limits
    assert limits.vocabulary["input_ids"][0] == 6000 and limits.vocabulary["token_type_ids"][0] == 2
    assert limits.positions[0] == 128
    attention = next(layer for layer in fused_bert.layers if layer.kind.selector == "fused-attention")
    assert attention.weight_shape == (128, 384) and attention.macs == LENGTH * 128 * 384
    # one rule reaches fused and unfused embeddings: w7a8 keeps the tables at 8 bits, as reduce_range does
    w7a8 = load_policy("w7a8").resolve(fused_bert.layers)
    assert w7a8.mapping["EmbedLayerNormalization_0"].weight_bits == 8


@pytest.mark.parametrize("policy_name,per_channel,reduce_range", [
    ("w8a8", False, False), ("w8a8-per-channel", True, False), ("w7a8", False, True)])
def test_fused_w8a8_is_quantize_dynamic_bit_for_bit(tmp_path, fused_bert, policy_name, per_channel, reduce_range):
    """On the fused graph, W8A8 through quantize_dynamic and through ptqaudit's rewrite (QAttention and
    QEmbedLayerNormalization fed ptqaudit's codes) equal quantize_dynamic called directly, bit for bit."""
    fused = tmp_path / "fused.onnx"
    onnx.save(fused_bert.proto, str(fused))
    direct = tmp_path / "direct.onnx"
    quantize_dynamic(fused, direct, weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=reduce_range,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    feed = _feed(4)
    expected = ort.InferenceSession(str(direct), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    resolved = load_policy(policy_name).resolve(fused_bert.layers)
    for force_rewrite in (False, True):
        quantized = quantize(fused_bert, resolved, force_rewrite=force_rewrite)
        op_types = [n.op_type for n in quantized.proto.graph.node]
        assert op_types.count("QAttention") == 2 and op_types.count("QEmbedLayerNormalization") == 1
        np.testing.assert_array_equal(make_session(quantized).run(None, feed)[0], expected,
                                      err_msg=f"rewrite={force_rewrite}")


def test_simulator_reproduces_fused_layers_at_every_width(fused_bert):
    """Every weight and activation width 2-8, per tensor and per channel, batch size 1 and 4 (padded): the
    simulator's logits equal ORT's on the QAttention / QEmbedLayerNormalization graph to float rounding."""
    sim = SimModel(fused_bert).eval()
    differences = []
    for bits, written in every_width():
        policy = written.resolve(fused_bert.layers)
        session = make_session(quantize(fused_bert, policy))
        for batch in (1, 4):
            feed = _feed(batch, seed=bits)
            with torch.no_grad():
                simulated = sim({k: torch.from_numpy(v) for k, v in feed.items()}, policy).numpy()
            measured = session.run(None, feed)[0]
            np.testing.assert_array_equal(simulated.argmax(1), measured.argmax(1), err_msg=f"{policy.name}, batch {batch}")
            differences.append(float(np.abs(measured - simulated).max()))
    differences = np.array(differences)
    # float ops agree to ulps, so now and then a value rounds to the neighbouring code
    assert np.mean(differences > 1e-4) <= 0.05, np.sort(differences)[-5:]


def test_cli_audits_a_fused_transformer(capsys, tmp_path):
    """`--optimize bert` from layers to report: eval names the fusion and measures QAttention graphs, search records
    the option in run.json, and report (which reads it back) runs on the same fused graph."""
    rng = np.random.default_rng(0)
    feed = _feed(24, seed=3)
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, **feed, y=rng.integers(0, 2, 24))
    code, out, _ = run_cli(capsys, "layers", BERT, "--input-shape", LENGTH, "--optimize", "bert")
    assert code == 0 and "@fused-attention" in out and "transformer optimizer fuses it for bert" in out
    code, out, _ = run_cli(capsys, "eval", BERT, "--data", tokens, "--optimize", "bert", "-p", "w8a8", "-p", "w4a4")
    assert code == 0 and "fused for bert" in out and "w4a4" in out
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "search", BERT, "--data", tokens, "--optimize", "bert", "-o", run,
                             "--max-evaluations", 6, "--search-limit", 12, "--verify-top", 1, "--bits", "4,8",
                             "--objective", "worst", "--no-progress")
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["config"]["optimize"] == "bert"
    worst = (run / "worst.yaml").read_text()
    assert "Attention_0" in worst and "EmbedLayerNormalization_0" in worst
    code, out, err = run_cli(capsys, "report", run, "--no-progress")
    assert code == 0, err
