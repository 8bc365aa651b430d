"""Text classifiers: tokenized data, inputs matched by name, token limits, embedding and activation-product layers
quantized as ONNX Runtime's quantize_dynamic quantizes them, checked against ORT and NumPy."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.quant_utils import quantize_data

from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.errors import PtqauditError
from ptqaudit.evaluate import check_model_fits_data, make_session, predict
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import load_policy, parse_policy
from ptqaudit.quantize import quantize
from ptqaudit.sim.engine import sim_predict
from ptqaudit.sim.model import SimModel
from ptqaudit.text_data import PERTURBATION_RATES, TEXT_PERTURBATIONS, TextConfig, perturb, tokenize

from test_cli import run_cli

VOCAB, HIDDEN, POSITIONS, CLASSES = 60, 8, 16, 2
SENTENCES = ["a fine film", "the plot is dull and slow", "an utterly wonderful , moving story", "bad",
             "it is not good at all", "good good good", "a film about a film about nothing", "wonderful"] * 4


def tiny_text_model(path, seed: int = 0) -> None:
    """input_ids, attention_mask [batch, sequence] -> word + position embeddings (Gather) -> masked mean over the
    sequence -> MatMul -> Add -> logits [batch, 2]: embeddings, a weight MatMul, and token limits to check."""
    rng = np.random.default_rng(seed)
    dims = ["batch", "sequence"]
    nodes = [
        helper.make_node("Gather", ["word_table", "input_ids"], ["words"], name="word_embeddings"),
        helper.make_node("Shape", ["input_ids"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["length"], name="length", axis=0),
        helper.make_node("Range", ["zero", "length", "one"], ["positions"], name="positions"),
        helper.make_node("Gather", ["position_table", "positions"], ["placed"], name="position_embeddings"),
        helper.make_node("Add", ["words", "placed"], ["embedded"], name="embed_sum"),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT, name="mask_float"),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"], name="mask3"),
        helper.make_node("Mul", ["embedded", "mask3"], ["masked"], name="masked"),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], name="total", keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], name="count", keepdims=0),
        helper.make_node("Div", ["total", "count"], ["pooled"], name="pooled"),
        helper.make_node("MatMul", ["pooled", "head"], ["scores"], name="classifier"),
        helper.make_node("Add", ["scores", "head_bias"], ["logits"], name="classifier_bias"),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("word_table", rng.normal(0, 1, (VOCAB, HIDDEN)).astype(np.float32)),
        ("position_table", rng.normal(0, 0.3, (POSITIONS, HIDDEN)).astype(np.float32)),
        ("head", rng.normal(0, 1, (HIDDEN, CLASSES)).astype(np.float32)),
        ("head_bias", np.zeros(CLASSES, np.float32)),
        ("zero", np.array(0, np.int64)), ("one", np.array(1, np.int64)),
        ("last", np.array([-1], np.int64)), ("axis1", np.array([1], np.int64))]]
    graph = helper.make_graph(nodes, "tiny_text", [helper.make_tensor_value_info(n, TensorProto.INT64, dims)
                                                   for n in ("input_ids", "attention_mask")],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], inits)
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


@pytest.fixture
def tokenizer_file(tmp_path):
    """A WordPiece tokenizer trained on SENTENCES, in the BERT layout ([PAD]=0 ... [CLS] $A [SEP])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")),
                                                  ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    assert tokenizer.get_vocab_size() <= VOCAB
    return path


@pytest.fixture
def text_model(tmp_path):
    path = tmp_path / "tiny_text.onnx"
    tiny_text_model(path)
    return path


def _write_tsv(path, rows, header=("sentence", "label")):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def test_tokenize_matches_the_tokenizer_and_pads_as_asked(tokenizer_file):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tokenizer_file))
    for padding in ("longest", "max-length"):
        inputs = tokenize(SENTENCES[:8], TextConfig(str(tokenizer_file), max_length=6, padding=padding))
        width = 6 if padding == "max-length" else max(min(len(reference.encode(s).ids), 6) for s in SENTENCES[:8])
        assert inputs.shape == (8, width)
        for row, sentence in enumerate(SENTENCES[:8]):
            encoding = reference.encode(sentence)
            ids = encoding.ids if len(encoding.ids) <= 6 else encoding.ids[:5] + [reference.token_to_id("[SEP]")]
            n = len(ids)
            assert inputs.lengths[row] == n
            assert inputs.arrays["input_ids"][row, :n].tolist() == ids
            assert (inputs.arrays["input_ids"][row, n:] == reference.token_to_id("[PAD]")).all()
            assert inputs.arrays["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert (inputs.arrays["token_type_ids"][row] == 0).all()
    # per-batch padding: a batch is cut to its own longest sentence
    inputs = tokenize(SENTENCES[:8], TextConfig(str(tokenizer_file), max_length=32))
    batch = inputs[[0, 3]].trimmed()
    assert batch.shape[1] == max(inputs.lengths[[0, 3]])
    fixed = inputs.with_padding("max-length", 32)
    assert fixed.shape == (8, 32) and (fixed.arrays["input_ids"][:, :inputs.shape[1]] == inputs.arrays["input_ids"]).all()


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_text_files_load_by_column(tmp_path, tokenizer_file, suffix):
    rows = [(s, i % 2) for i, s in enumerate(SENTENCES[:6])]
    path = tmp_path / f"reviews{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"review": s, "stars": y}) for s, y in rows))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        path.write_text("review" + sep + "stars\n" + "".join(f'"{s}"{sep}{y}\n' if sep == "," else f"{s}{sep}{y}\n"
                                                             for s, y in rows))
    text = TextConfig(str(tokenizer_file), text_column="review", label_column="stars")
    dataset = load_dataset(DataConfig(str(path), text=text))
    assert dataset.is_text and len(dataset) == 6 and dataset.unit == "sentences"
    assert dataset.x.texts == [s for s, _ in rows] and dataset.y.tolist() == [y for _, y in rows]
    with pytest.raises(PtqauditError, match="no column text.*its columns: review, stars"):
        load_dataset(DataConfig(str(path), text=TextConfig(str(tokenizer_file), text_column="text",
                                                           label_column="stars")))


def test_bad_text_input_is_one_clear_error(tmp_path, tokenizer_file):
    good = TextConfig(str(tokenizer_file))
    path = _write_tsv(tmp_path / "bad.tsv", [("fine", 1), ("dull", "positive")])
    with pytest.raises(PtqauditError, match="row 3: label is 'positive': expected a class index"):
        load_dataset(DataConfig(str(path), text=good))
    path = _write_tsv(tmp_path / "ok.tsv", [("fine", 1)])
    with pytest.raises(PtqauditError, match="needs --tokenizer"):
        load_dataset(DataConfig(str(path)))
    with pytest.raises(PtqauditError, match="not a readable tokenizer.json"):
        (tmp_path / "junk.json").write_text("{]")
        load_dataset(DataConfig(str(path), text=TextConfig(str(tmp_path / "junk.json"))))
    with pytest.raises(PtqauditError, match="--data sst2 needs --data-root"):
        load_dataset(DataConfig("sst2", text=good))


def test_sst2_folder(sst2_root, tokenizer_file):
    import csv

    text = TextConfig(str(tokenizer_file))
    dev = load_dataset(DataConfig("sst2", root=sst2_root, text=text))
    folder = next(p for p in (sst2_root, f"{sst2_root}/SST-2") if __import__("os").path.isfile(f"{p}/dev.tsv"))
    with open(f"{folder}/dev.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(dev) == len(rows) == 872 and dev.classes == ["negative", "positive"]
    assert dev.x.texts == [r["sentence"] for r in rows] and dev.y.tolist() == [int(r["label"]) for r in rows]
    subset = load_dataset(DataConfig("sst2", root=sst2_root, split="train", limit=100, text=text))
    assert len(subset) == 100 and sorted(np.bincount(subset.y).tolist()) == [50, 50]


def test_perturbations_touch_the_share_of_words_their_severity_says():
    texts = [" ".join(f"word{i}" for i in range(40))] * 50
    words = 40 * 50
    for kind in TEXT_PERTURBATIONS:
        for severity in (1, 5):
            out = perturb(texts, kind, severity)
            assert out == perturb(texts, kind, severity)  # deterministic
            if kind == "dropped_words":
                touched = words - sum(len(t.split(" ")) for t in out)
            else:
                touched = sum(a != b for t, o in zip(texts, out) for a, b in zip(t.split(" "), o.split(" ")))
            assert abs(touched / words - PERTURBATION_RATES[severity - 1]) < 0.03, (kind, severity)


def _token_npz(path, ids, mask, **extra):
    np.savez(path, input_ids=ids, attention_mask=mask, y=np.arange(len(ids)) % 2, **extra)
    return path


def test_inputs_are_matched_by_name_and_token_limits_checked(tmp_path, text_model):
    model = load_model(text_model, (5,))
    assert model.is_text and model.input_names == ["input_ids", "attention_mask"]
    assert model.token_limits.vocabulary == {"input_ids": (VOCAB, "word_table")}
    assert model.token_limits.positions == (POSITIONS, "position_table")
    ids, mask = np.ones((4, 5), np.int64), np.ones((4, 5), np.int64)
    ok = load_dataset(DataConfig(str(_token_npz(tmp_path / "ok.npz", ids, mask))))
    check_model_fits_data(model, ok, 1)
    extra = load_dataset(DataConfig(str(_token_npz(tmp_path / "extra.npz", ids, mask, token_type_ids=0 * ids))))
    with pytest.raises(PtqauditError, match="token_type_ids match.* no model input; the model's inputs are "
                                            "input_ids, attention_mask"):
        check_model_fits_data(model, extra, 1)
    np.savez(tmp_path / "missing.npz", input_ids=ids, y=np.zeros(4, int))
    with pytest.raises(PtqauditError, match="no data for model input.* attention_mask"):
        check_model_fits_data(model, load_dataset(DataConfig(str(tmp_path / "missing.npz"))), 1)
    big = ids.copy()
    big[2, 3] = VOCAB
    with pytest.raises(PtqauditError, match=f"input input_ids holds token id {VOCAB}, outside .*'word_table' of "
                                            f"{VOCAB} rows"):
        check_model_fits_data(model, load_dataset(DataConfig(str(_token_npz(tmp_path / "big.npz", big, mask)))), 1)
    long = np.ones((2, POSITIONS + 1), np.int64)
    with pytest.raises(PtqauditError, match=f"{POSITIONS + 1} tokens .*'position_table' has {POSITIONS} rows"):
        check_model_fits_data(model, load_dataset(DataConfig(str(_token_npz(tmp_path / "long.npz", long, long)))), 1)


def test_cli_refuses_mismatched_text_data_with_exit_2(capsys, tmp_path, text_model):
    ids = np.ones((4, 5), np.int64)
    path = _token_npz(tmp_path / "extra.npz", ids, ids, segment_ids=ids)
    code, _, err = run_cli(capsys, "eval", text_model, "--data", path, "-p", "w8a8")
    assert code == 2 and "segment_ids" in err and "input_ids, attention_mask" in err


def test_embedding_table_codes_are_quantize_dynamic_s(text_model):
    """The table codes, scale and zero point of a quantized embedding equal ORT's own quantize_data (asymmetric
    uint8, which quantize_dynamic uses for Gather whatever the weight type), at 8 bits and as the rewrite's 4."""
    model = load_model(text_model, (5,))
    table = numpy_helper.to_array(next(i for i in model.proto.graph.initializer if i.name == "word_table"))
    for bits in (8, 4):
        policy = parse_policy({"default": {"weight_bits": bits, "activation_bits": 8}}, "p", "test")
        quantized = quantize(model, policy.resolve(model.layers), force_rewrite=True)
        tensors = quantized.layer_tensors["word_embeddings"]
        stored = {i.name: numpy_helper.to_array(i) for i in quantized.proto.graph.initializer}
        zero_point, scale, codes = quantize_data(table, TensorProto.UINT8, symmetric=False)
        if bits == 8:
            np.testing.assert_array_equal(stored[tensors["w_codes"]], codes)
            assert stored[tensors["w_scale"]] == scale
        else:  # the same formula on 0..15: NumPy
            low, high = min(table.min(), 0), max(table.max(), 0)
            scale4 = np.float32((np.float64(high) - np.float64(low)) / 15)
            zp4 = np.round(-np.float64(low) / ((np.float64(high) - np.float64(low)) / 15))
            expected = np.clip(np.round(table / scale4) + zp4, 0, 15).astype(np.uint8)
            np.testing.assert_array_equal(stored[tensors["w_codes"]], expected)
            assert stored[tensors["w_scale"]] == scale4


@pytest.mark.parametrize("policy_name", ["w8a8", "w7a8", "w8a8-per-channel"])
def test_built_in_policies_match_quantize_dynamic_on_a_text_model(tmp_path, text_model, policy_name):
    """Through quantize_dynamic and through ptqaudit's own rewrite, the logits equal those of calling
    quantize_dynamic directly with its defaults (embeddings quantized too), bit for bit."""
    model = load_model(text_model, (5,))
    rng = np.random.default_rng(3)
    feeds = {"input_ids": rng.integers(0, VOCAB, (6, 5)), "attention_mask": np.ones((6, 5), np.int64)}
    feeds["attention_mask"][2, 3:] = 0
    direct = tmp_path / "direct.onnx"
    quantize_dynamic(text_model, direct, weight_type=QuantType.QInt8, reduce_range=policy_name == "w7a8",
                     per_channel=policy_name == "w8a8-per-channel")
    expected = ort.InferenceSession(str(direct), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    policy = load_policy(policy_name).resolve(model.layers)
    for force_rewrite in (False, True):
        got = make_session(quantize(model, policy, force_rewrite=force_rewrite)).run(None, feeds)[0]
        np.testing.assert_array_equal(got, expected)


def test_simulator_reproduces_ort_on_a_text_model(tmp_path, text_model):
    model = load_model(text_model, (5,))
    rng = np.random.default_rng(4)
    lengths = rng.integers(1, 9, 40)
    mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int64)
    path = _token_npz(tmp_path / "d.npz", rng.integers(1, VOCAB, (40, 8)) * mask, mask)
    dataset = load_dataset(DataConfig(str(path)))
    sim = SimModel(model).eval()
    for name in ("w8a8", "w4a8", "w2a8"):
        policy = load_policy(name).resolve(model.layers)
        for batch_size in (1, 8):
            ort_run = predict(make_session(quantize(model, policy)), dataset, batch_size, "", progress=False)
            sim_run = sim_predict(sim, dataset, policy, batch_size, progress=False)
            np.testing.assert_allclose(sim_run.logits, ort_run.logits, rtol=0, atol=1e-5)
            assert (sim_run.labels == ort_run.labels).all()


def test_search_and_report_speak_text(capsys, tmp_path, text_model, tokenizer_file):
    """search -> report on a text model from a .tsv: the report's JSON carries the flipped sentences themselves,
    accuracy by length, both paddings measured on ORT, and the text perturbations."""
    rows = [(s, i % 2) for i, s in enumerate(SENTENCES)]
    data = _write_tsv(tmp_path / "reviews.tsv", rows)
    common = ["--data", data, "--tokenizer", tokenizer_file, "--max-length", 12]
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "search", text_model, *common, "--max-evaluations", 6, "--method", "random",
                             "--bits", "2,8", "--budget-avg-bits", 4, "--objective", "worst", "--no-progress", "-o", run)
    assert code == 0, err
    assert f"{len(rows)} sentences" in out and "padded per batch" in out
    code, out, err = run_cli(capsys, "report", run, "--format", "json", "--analysis-limit", len(rows), "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    analysis = report["analysis"]
    assert analysis["unit"] == "sentences" and report["headline"]["unit"] == "sentences"
    flipped = analysis["per_input"]["flipped_inputs"]
    assert all(f["text"] == SENTENCES[f["index"]] for f in flipped)  # the analysis subset is every sentence, in order
    assert sum(r["sentences"] for r in analysis["by_length"]) == len(rows)
    assert [r["padding"] for r in analysis["padding"]] == ["longest", "max-length"]
    # the same sentences, so FP32 under either padding is the FP32 the analysis measured (masked mean pooling)
    assert all(r["fp32_accuracy"] == pytest.approx(analysis["fp32_accuracy"]) for r in analysis["padding"])
    assert {r["corruption"] for r in analysis["corruptions"]} == set(TEXT_PERTURBATIONS)
    code, out, err = run_cli(capsys, "report", run, "--format", "md", "-o", tmp_path / "r.md",
                             "--analysis-limit", len(rows), "--no-progress")
    assert code == 0, err
    markdown = (tmp_path / "r.md").read_text()
    assert "Accuracy by sentence length" in markdown and "Text perturbations" in markdown and "padding" in markdown
