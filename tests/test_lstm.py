"""LSTM layers: ptqaudit's graphs against quantize_dynamic's DynamicQuantizeLSTM, the unfused graph below 8 bits
against that kernel, and the simulator against ORT at every width, batch size and thread count."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

import ptqaudit.quantize as quantize_module
from ptqaudit.errors import PtqauditError
from ptqaudit.evaluate import make_session
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import LayerQuant, load_policy, parse_policy
from ptqaudit.quantize import quantize
from ptqaudit.sim.model import SimModel
from ptqaudit.sim.recurrent import state_block_rows

VOCAB, EMBED, HIDDEN, CLASSES = 50, 12, 10, 3


def lstm_classifier(path, direction: str = "forward", bias: bool = True, initial: bool = False,
                    lengths: bool = False, seed: int = 0) -> None:
    """input_ids [batch, sequence] -> embedding -> LSTM (sequence first) -> mean over steps -> Gemm -> logits.
    initial: the initial states come from the embedding's first step (a runtime input, not zeros); lengths: the
    LSTM gets sequence_lens (every sentence's full length)."""
    rng = np.random.default_rng(seed)
    directions = 2 if direction == "bidirectional" else 1
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"], name="embedding"),
        helper.make_node("Transpose", ["embedded"], ["steps"], perm=[1, 0, 2], name="sequence_first"),
    ]
    lstm_inputs = ["steps", "W", "R", "B" if bias else ""]
    if lengths:
        nodes += [helper.make_node("Shape", ["input_ids"], ["shape"], name="shape"),
                  helper.make_node("Cast", ["shape"], ["shape32"], to=TensorProto.INT32, name="shape32"),
                  helper.make_node("Slice", ["shape32", "one", "two"], ["length"], name="length"),
                  helper.make_node("Slice", ["shape", "zero64", "one64"], ["batch"], name="batch"),
                  helper.make_node("Expand", ["length", "batch"], ["lens"], name="lens")]
    lstm_inputs.append("lens" if lengths else "")
    if initial:
        nodes += [helper.make_node("Slice", ["steps", "zero64", "one64"], ["first"], name="first_step"),
                  helper.make_node("Slice", ["first", "zero64", "hidden64", "two64"], ["first_h"], name="first_h"),
                  helper.make_node("Concat", ["first_h"] * directions, ["h0"], axis=0, name="h0"),
                  helper.make_node("Neg", ["h0"], ["c0"], name="c0")]
        lstm_inputs += ["h0", "c0"]
    nodes += [
        helper.make_node("LSTM", lstm_inputs, ["y"], hidden_size=HIDDEN, direction=direction, name="lstm"),
        helper.make_node("ReduceMean", ["y"], ["pooled"], axes=[0], keepdims=0, name="pool"),
        helper.make_node("Transpose", ["pooled"], ["batch_first"], perm=[1, 0, 2], name="batch_first"),
        helper.make_node("Reshape", ["batch_first", "flat"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", "head", "head_bias"], ["logits"], transB=1, name="classifier"),
    ]
    arrays = {
        "table": rng.normal(0, 1, (VOCAB, EMBED)), "W": rng.normal(0, 0.5, (directions, 4 * HIDDEN, EMBED)),
        "R": rng.normal(0, 0.5, (directions, 4 * HIDDEN, HIDDEN)), "B": rng.normal(0, 0.3, (directions, 8 * HIDDEN)),
        "head": rng.normal(0, 1, (CLASSES, directions * HIDDEN)), "head_bias": np.zeros(CLASSES),
    }
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in arrays.items() if bias or n != "B"]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in [
        ("flat", [-1, directions * HIDDEN]), ("zero64", [0]), ("one64", [1]), ("two64", [2]), ("hidden64", [HIDDEN])]]
    inits += [numpy_helper.from_array(np.array(v, np.int32), n) for n, v in [("zero", [0]), ("one", [1]), ("two", [2])]]
    graph = helper.make_graph(nodes, "lstm_classifier",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], inits)
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))


def _ids(batch: int, length: int = 9, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int64)


def _policy(weight_bits: int, activation_bits: int, per_channel: bool = False):
    setting = {"weight_bits": weight_bits, "activation_bits": activation_bits}
    if per_channel:
        setting["granularity"] = "per-channel"
    name = f"w{weight_bits}a{activation_bits}" + ("-per-channel" if per_channel else "")
    return parse_policy({"default": setting}, name, "test")


def every_width():
    """(bits, policy) for every width 2-8 of the weights (activations at 8), of the activations (weights at 8) and
    of both, per tensor and per channel."""
    for bits in range(2, 9):
        for weight_bits, activation_bits in ((bits, 8), (8, bits), (bits, bits)):
            for per_channel in (False, True):
                yield bits, _policy(weight_bits, activation_bits, per_channel)


def _run(session_or_quantized, ids, threads: int = 0) -> np.ndarray:
    session = session_or_quantized if isinstance(session_or_quantized, ort.InferenceSession) else \
        make_session(session_or_quantized, threads=threads)
    return session.run(None, {"input_ids": ids})[0]


@pytest.mark.parametrize("direction,per_channel,reduce_range", [
    ("forward", False, False), ("forward", True, False), ("bidirectional", False, False),
    ("bidirectional", True, False), ("reverse", False, True)])
def test_w8a8_lstm_is_quantize_dynamic_bit_for_bit(tmp_path, direction, per_channel, reduce_range):
    """W8A8 (W7A8 for reduce_range) through quantize_dynamic and through ptqaudit's rewrite equal quantize_dynamic
    called directly: the same DynamicQuantizeLSTM with the same codes and scales (per direction, or per gate unit)."""
    path = tmp_path / "lstm.onnx"
    lstm_classifier(path, direction)
    model = load_model(path, (9,))
    assert [layer.kind.selector for layer in model.layers] == ["embedding", "lstm", "Gemm"]
    direct = tmp_path / "direct.onnx"
    quantize_dynamic(path, direct, weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=reduce_range)
    ids = _ids(5)
    expected = _run(ort.InferenceSession(str(direct), providers=["CPUExecutionProvider"]), ids)
    # the built-in w7a8 keeps embedding tables at 8 bits, as quantize_dynamic does under reduce_range
    policy = load_policy("w7a8") if reduce_range else _policy(8, 8, per_channel)
    resolved = policy.resolve(model.layers)
    for force_rewrite in (False, True):
        quantized = quantize(model, resolved, force_rewrite=force_rewrite)
        assert [n.op_type for n in quantized.proto.graph.node].count("DynamicQuantizeLSTM") == 1
        np.testing.assert_array_equal(_run(quantized, ids), expected, err_msg=f"rewrite={force_rewrite}")


@pytest.mark.parametrize("options", [dict(direction="forward"), dict(direction="reverse", bias=False),
                                     dict(direction="bidirectional", initial=True)],
                         ids=["forward", "reverse-no-bias", "bidirectional-initial-states"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_unfused_lstm_at_8_bits_is_dynamic_quantize_lstm(tmp_path, monkeypatch, options, per_channel):
    """The unfused graph (Scan over quantized steps) that runs activation widths below 8 is the kernel's own
    arithmetic: at 8 bits and batch size 1 (where the kernel does not split the batch) its logits equal
    DynamicQuantizeLSTM's bit for bit, at 4-bit weights (codes ORT's quantizer never makes) too."""
    path = tmp_path / "lstm.onnx"
    lstm_classifier(path, **options)
    model = load_model(path, (9,))
    for weight_bits in (8, 4):
        policy = _policy(weight_bits, 8, per_channel).resolve(model.layers)
        fused = quantize(model, policy)
        with monkeypatch.context() as patch:
            # the unfused graph at 8-bit activations, where the rewrite would otherwise use DynamicQuantizeLSTM
            patch.setattr(quantize_module._Rewriter, "lstm_layer",
                          lambda self, node, layer, q: self.unfused_lstm_layer(node, q))
            scan = quantize(model, policy, force_rewrite=True)
        assert "Scan" in {n.op_type for n in scan.proto.graph.node}
        for seed in range(3):
            ids = _ids(1, seed=seed)
            np.testing.assert_array_equal(_run(scan, ids), _run(fused, ids), err_msg=f"w{weight_bits}, seed {seed}")


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_simulator_reproduces_ort_lstm_at_every_width(tmp_path, direction):
    """Every weight and activation width 2-8, per tensor and per channel, at batch size 1 and 6: the simulator
    predicts what ORT predicts for every sentence, and its logits equal ORT's to float rounding (DynamicQuantizeLSTM
    at 8-bit activations, the unfused graph below), under this machine's kernel family and ORT's default thread
    count. Float ops agree to ulps only, so now and then a hidden state rounds to the neighbouring code, and the
    flip runs on through the later steps: a few sentences may differ by more."""
    path = tmp_path / "lstm.onnx"
    lstm_classifier(path, direction, initial=True)
    model = load_model(path, (9,))
    sim = SimModel(model).eval()
    differences = []
    for bits, written in every_width():
        policy = written.resolve(model.layers)
        quantized = quantize(model, policy)
        for batch in (1, 6):
            ids = _ids(batch, seed=bits)
            with torch.no_grad():
                simulated = sim({"input_ids": torch.from_numpy(ids)}, policy).numpy()
            measured = _run(quantized, ids)
            np.testing.assert_array_equal(simulated.argmax(1), measured.argmax(1), err_msg=f"{policy.name}, batch {batch}")
            differences += list(np.abs(measured - simulated).max(axis=1))
    differences = np.array(differences)
    assert np.mean(differences > 1e-4) <= 0.05, np.sort(differences)[-10:]
    assert differences.max() < 0.05, differences.max()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_lstm_range_blocks_follow_ort_thread_count(tmp_path, threads):
    """DynamicQuantizeLSTM gives each intra-op thread's block of the batch its own hidden-state range: ORT at 1, 2
    and 3 threads is reproduced by the simulator told that count, and (batch 6) by no other block size."""
    path = tmp_path / "lstm.onnx"
    lstm_classifier(path, seed=3)
    model = load_model(path, (9,))
    policy = load_policy("w8a8").resolve(model.layers)
    ids = _ids(6, seed=4)
    measured = _run(quantize(model, policy), ids, threads=threads)
    errors = {}
    for assumed in (1, 2, 3):
        sim = SimModel(model, ort_threads=assumed).eval()
        with torch.no_grad():
            errors[assumed] = float(np.abs(sim({"input_ids": torch.from_numpy(ids)}, policy).numpy() - measured).max())
    assert errors[threads] < 1e-5, errors
    assert all(error > 1e-4 for assumed, error in errors.items() if assumed != threads), errors
    assert state_block_rows(6, HIDDEN, threads) == -(-6 // threads)


def test_lstm_layer_shape_macs_and_params(tmp_path):
    """`layers` counts an LSTM's MACs per input as steps x directions x 4H x (K + H), and W, R and B as its params."""
    path = tmp_path / "lstm.onnx"
    lstm_classifier(path, "bidirectional")
    model = load_model(path, (9,))
    lstm = model.layer("lstm")
    assert lstm.macs == 9 * 2 * 4 * HIDDEN * (EMBED + HIDDEN)
    assert lstm.params == 2 * 4 * HIDDEN * EMBED + 2 * 4 * HIDDEN * HIDDEN + 2 * 8 * HIDDEN
    assert lstm.output_shape == (9, 2, "batch", HIDDEN)
    assert model.unaudited == []


def test_unfused_lstm_refuses_what_it_cannot_reproduce(tmp_path):
    """sequence_lens is fine at 8-bit activations (DynamicQuantizeLSTM takes it, and the simulator follows) but
    the unfused graph below 8 bits does not spell it out: one clear error naming the LSTM and the feature."""
    path = tmp_path / "lstm.onnx"
    lstm_classifier(path, lengths=True)
    model = load_model(path, (9,))
    w8a8 = load_policy("w8a8").resolve(model.layers)
    ids = _ids(3)
    with torch.no_grad():
        simulated = SimModel(model).eval()({"input_ids": torch.from_numpy(ids)}, w8a8).numpy()
    np.testing.assert_allclose(simulated, _run(quantize(model, w8a8), ids), atol=1e-5)
    with pytest.raises(PtqauditError, match="LSTM 'lstm' uses sequence_lens"):
        quantize(model, _policy(8, 4).resolve(model.layers))


def test_lstm_setting_reaches_the_layer_by_kind(tmp_path):
    """@lstm selects the LSTM: a rule for it changes only that layer's setting."""
    path = tmp_path / "lstm.onnx"
    lstm_classifier(path)
    model = load_model(path, (9,))
    rules = {"default": {"weight_bits": 8, "activation_bits": 8}, "layers": {"@lstm": {"weight_bits": 4, "activation_bits": 4}}}
    policy = parse_policy(rules, "lstm-w4a4", "test").resolve(model.layers)
    assert policy.mapping["lstm"] == LayerQuant(4, 4)
    assert policy.mapping["classifier"] == LayerQuant(8, 8)


def test_distilled_lstm_exports_its_trained_weights(tmp_path):
    """A student's LSTM goes back into the ONNX graph whole: W, R and B as the simulator holds them."""
    from ptqaudit.distill import export_student

    path = tmp_path / "lstm.onnx"
    lstm_classifier(path)
    model = load_model(path, (9,))
    sim = SimModel(model)
    layer = sim.quant_layer("lstm")
    with torch.no_grad():
        for parameter in (layer.weight, layer.recurrent, layer.bias):
            parameter.mul_(0.5)
    exported = {init.name: numpy_helper.to_array(init) for init in export_student(model, sim).graph.initializer}
    np.testing.assert_array_equal(exported["W"], layer.weight.detach().numpy())
    np.testing.assert_array_equal(exported["R"], layer.recurrent.detach().numpy())
    np.testing.assert_array_equal(exported["B"], layer.bias.detach().numpy())
    original = {init.name: numpy_helper.to_array(init) for init in model.proto.graph.initializer}
    np.testing.assert_allclose(exported["R"], original["R"] * 0.5)


def test_batch_first_lstm_stays_float_and_is_named(tmp_path):
    """DynamicQuantizeLSTM has no layout attribute: a batch-first LSTM (layout=1) is no layer, and the model's note
    names it."""
    path = tmp_path / "lstm.onnx"
    lstm_classifier(path)
    model = onnx.load(str(path))
    nodes = {node.name: node for node in model.graph.node}
    nodes["lstm"].attribute.append(helper.make_attribute("layout", 1))
    for name in ("sequence_first", "batch_first"):  # the batch stays first throughout: [batch, seq, ...]
        nodes[name].attribute[0].CopyFrom(helper.make_attribute("perm", [0, 1, 2]))
    nodes["pool"].attribute[0].CopyFrom(helper.make_attribute("axes", [1]))
    model.opset_import[0].version = 14  # LSTM's layout attribute came with opset 14
    onnx.save(model, str(path))
    loaded = load_model(path, (9,))
    assert "lstm" not in [layer.name for layer in loaded.layers]
    assert loaded.unaudited == ["LSTM lstm"] and "LSTM lstm" in loaded.unaudited_note
