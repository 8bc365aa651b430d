"""`ptqaudit distill`: losses against NumPy, the exported student against ORT, short runs on the digits model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import yaml
from reference_cases import ort_labels

from ptqaudit.cli import main
from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.distill import (MODE_DEFAULTS, SELECTION_EXAMPLES, DistillConfig, _epoch_batches, _PolicyRound, _training_policies,
                              _LayerInputs, _layer_weights, augmented, distillation_loss, export_student, kurtosis_loss,
                              learning_rate, quantized_loss, range_loss, run_distill, WeightGrid)
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import load_policy
from ptqaudit.quantize import quantize
from ptqaudit.search.evaluator import Leaderboard, SimEvaluator
from ptqaudit.search.methods import PolicyAgent, rl_search
from ptqaudit.search.sensitivity import probe_sensitivity
from ptqaudit.search.space import Budget, Objective, SearchSpace, layer_features
from ptqaudit.sim.model import SimModel

REPO = Path(__file__).resolve().parent.parent
DIGITS_MODEL = str(REPO / "sample_models" / "digits_cnn.onnx")


@pytest.fixture(scope="module")
def digits():
    return load_model(DIGITS_MODEL)


@pytest.fixture(scope="module")
def digits_data():
    return load_dataset(DataConfig("digits", split="train")), load_dataset(DataConfig("digits"))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_losses_match_numpy():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (16, 10)), rng.normal(0, 3, (16, 10))
    labels = rng.integers(0, 10, 16)
    t = 4.0
    p_teacher, p_student = _softmax(teacher / t), _softmax(student / t)
    expected_kd = np.mean(np.sum(p_teacher * (np.log(p_teacher) - np.log(p_student)), axis=1)) * t * t
    expected_detrimental = np.mean(-np.log(1 - _softmax(student)[np.arange(16), labels]))
    s, te, y = torch.tensor(student), torch.tensor(teacher), torch.tensor(labels)
    assert distillation_loss(s, te, t).item() == pytest.approx(expected_kd, rel=1e-9)
    assert quantized_loss(s, te, y, "robust", t).item() == pytest.approx(expected_kd, rel=1e-9)
    assert quantized_loss(s, te, y, "detrimental", t).item() == pytest.approx(expected_detrimental, rel=1e-9)


@pytest.mark.parametrize("images, min_batches, passes", [(300, 5, 2), (300, 3, 1), (1000, 8, 1), (1000, 9, 2)])
def test_an_epoch_repeats_a_small_training_set_until_it_has_its_batches(images, min_batches, passes):
    """Every pass over the images is a permutation of them, in batches of the training batch size, and there are as
    many passes as reach min_epoch_batches batches (one when a pass already does)."""
    config = DistillConfig(teacher="", data=DataConfig("digits"), output="", mode="robust", min_epoch_batches=min_batches)
    batches = _epoch_batches(images, config, np.random.default_rng(0))
    order = np.concatenate(batches)
    assert len(order) == passes * images and len(batches) >= min_batches
    assert all(len(batch) == config.train_batch_size for batch in batches[:-1])
    for i in range(passes):
        assert sorted(order[i * images:(i + 1) * images]) == list(range(images))


def test_cosine_learning_rate_falls_from_the_peak_to_zero_and_constant_stays():
    rates = [learning_rate(1e-3, "cosine", step, 100) for step in range(101)]
    assert rates[0] == pytest.approx(1e-3) and rates[50] == pytest.approx(5e-4) and rates[100] == pytest.approx(0)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert {learning_rate(1e-3, "constant", step, 100) for step in range(101)} == {1e-3}


def test_augmented_images_are_shifted_and_mirrored_copies_within_an_eighth():
    """Each augmented image equals its original shifted by at most an eighth of its size (zero-filled) and
    perhaps mirrored: found by enumerating every shift and mirror in NumPy; both mirror states occur."""
    rng = np.random.default_rng(3)
    x = rng.random((24, 3, 16, 8)).astype(np.float32) + 0.5  # no zeros: the fill tells the shift apart
    out = augmented(torch.from_numpy(x), np.random.default_rng(0)).numpy()
    assert out.shape == x.shape
    mirrored = []
    for original, result in zip(x, out):
        padded = np.pad(original, ((0, 0), (2, 2), (1, 1)))
        matches = [(dy, dx, flip) for dy in range(5) for dx in range(3) for flip in (False, True)
                   if np.array_equal(result, (lambda c: c[..., ::-1] if flip else c)(padded[:, dy:dy + 16, dx:dx + 8]))]
        assert len(matches) == 1
        mirrored.append(matches[0][2])
    assert 0 < sum(mirrored) < len(mirrored)


def test_kurtosis_loss_matches_scipy(digits):
    """KURE's term: the mean over layers of (kurtosis - 1.8)^2, kurtosis as SciPy's (Pearson's) over all weights."""
    from scipy.stats import kurtosis
    sim = SimModel(digits)
    weights = [sim.quant_layer(layer.name).weight.detach().double().numpy().ravel() for layer in digits.layers]
    expected = np.mean([(kurtosis(w, fisher=False) - 1.8) ** 2 for w in weights])
    assert kurtosis_loss(sim, digits.layers).item() == pytest.approx(expected, rel=1e-4)


def _on_grid(weight: np.ndarray, bits: int) -> np.ndarray:
    """NumPy: weight / (max|weight| / (2^(bits-1) - 1)), which is an integer array on the symmetric grid."""
    return weight.astype(np.float64) / (np.abs(weight).max() / (2 ** (bits - 1) - 1))


def test_weight_grid_keeps_every_layer_on_its_4_bit_grid_while_the_latents_train(digits, digits_data):
    """The student's weights are k * max|w| / 7 with integer |k| <= 7 (NumPy), and the nearest such values to the
    latents (round half to even, as ORT's quantizer); 8-bit quantization moves each by at most half its step; an
    optimizer step moves the latents by the gradient the grid weights received and the weights stay on the grid."""
    train, _ = digits_data
    sim = SimModel(digits)
    grid = WeightGrid(sim, digits.layers, 4)
    assert len(grid.layers) == len(digits.layers)

    def check_on_grid():
        for layer, latent in zip(grid.layers, grid.latents):
            w, latent = layer.weight.detach().numpy(), latent.numpy().astype(np.float64)
            k = _on_grid(w, 4)
            assert np.abs(k - np.round(k)).max() < 1e-4 and np.abs(k).max() == pytest.approx(7)
            scale = np.abs(latent).max() / 7
            np.testing.assert_allclose(w, np.round(latent / scale) * scale, rtol=0, atol=1e-6 * scale)
            scale_8 = np.abs(w).max() / 127
            assert np.abs(np.round(w / scale_8) * scale_8 - w).max() <= scale_8 / 2 * (1 + 1e-5)

    check_on_grid()
    before = [latent.clone() for latent in grid.latents]
    optimizer = torch.optim.Adam(sim.parameters(), lr=1e-3)
    x = torch.from_numpy(train.x[:64])
    loss = F.cross_entropy(sim(x), torch.from_numpy(train.y[:64]).long())
    loss.backward()
    gradients = [layer.weight.grad.clone() for layer in grid.layers]
    grid.step(optimizer)
    for latent, previous, gradient in zip(grid.latents, before, gradients):
        moved, gradient = (latent - previous).numpy(), gradient.numpy()
        # Adam's first step: the rate times g / (|g| + 1e-8), against the gradient the grid weight received
        np.testing.assert_allclose(moved, -1e-3 * gradient / (np.abs(gradient) + 1e-8), rtol=1e-3, atol=5e-8)
        assert np.abs(moved).max() > 0
    check_on_grid()


def test_range_loss_matches_numpy_on_the_inputs_each_layer_receives(digits, digits_data):
    """The range term: the mean over weights of log(max|w|^2 / mean w^2) and over layer inputs of the per-sample
    log(span^2 / mean x^2), the span widened to include 0 as DynamicQuantizeLinear's range; the inputs collected
    while the fp32 pass runs are the first layer's input image and then each layer's own."""
    sim = SimModel(digits)
    x = torch.from_numpy(digits_data[1].x[:16])
    with _LayerInputs(sim, digits.layers, True) as collected:
        sim(x)
    assert len(collected.inputs) == len(digits.layers) and torch.equal(collected.inputs[0], x)
    with torch.no_grad(), _LayerInputs(sim, digits.layers, False) as nothing:  # off: no hooks, nothing collected
        sim(x)
    assert nothing.inputs == []
    weights = [w.detach().double().numpy() for w in _layer_weights(sim, digits.layers)]
    inputs = [a.detach().double().numpy().reshape(len(x), -1) for a in collected.inputs]
    terms = [np.log(np.abs(w).max() ** 2 / np.mean(w**2)) for w in weights]
    for rows in inputs:
        span = np.maximum(rows.max(axis=1), 0) - np.minimum(rows.min(axis=1), 0)
        terms.append(np.mean(np.log(span**2 / np.mean(rows**2, axis=1))))
    assert range_loss(_layer_weights(sim, digits.layers), collected.inputs).item() == pytest.approx(np.mean(terms), rel=1e-4)


def _digits_space(digits) -> SearchSpace:
    return SearchSpace(digits.layers, load_policy("w8a8").resolve(digits.layers), (4, 8),
                       [layer.name for layer in digits.layers], Budget.from_average_bits(6.0, digits.total_macs))


def test_robust_batches_train_under_the_candidates_the_student_does_worst_under(digits, digits_data):
    """A robust batch trains under the policies_per_batch candidates with the largest distillation loss on its first
    SELECTION_EXAMPLES examples, each loss recomputed here from ORT's logits of the quantized graphs at batch size 1;
    a detrimental batch takes the candidates in turn."""
    space = _digits_space(digits)
    rng = np.random.default_rng(3)
    candidates = [space.policy(space.uniform(0)), space.policy(space.uniform(1))] + [
        space.policy(rng.integers(0, 2, size=(len(space.searched), 2))) for _ in range(2)]
    x = digits_data[0].x[:48]
    (teacher,) = ort.InferenceSession(digits.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {digits.input_name: x})

    def ort_loss(policy) -> float:
        session = ort.InferenceSession(quantize(digits, policy).proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        judged = x[:SELECTION_EXAMPLES]
        logits = np.concatenate([session.run(None, {digits.input_name: judged[i:i + 1]})[0] for i in range(len(judged))])
        p_teacher, p_student = _softmax(teacher[:SELECTION_EXAMPLES] / 4.0), _softmax(logits / 4.0)
        return float(np.mean(np.sum(p_teacher * (np.log(p_teacher) - np.log(p_student)), axis=1)) * 16)

    losses = np.array([ort_loss(policy) for policy in candidates])
    order = np.argsort(losses)[::-1]
    assert losses[order[1]] > 1.01 * losses[order[2]]  # the top two are clearly apart from the rest
    sim = SimModel(digits).eval()
    for count in (1, 2):
        config = DistillConfig(teacher=DIGITS_MODEL, data=DataConfig("digits"), output="", mode="robust",
                               policies_per_batch=count)
        chosen = _training_policies(0, candidates, sim, torch.from_numpy(x), torch.from_numpy(teacher),
                                    torch.zeros(len(x), dtype=torch.long), config, "sample")
        assert [policy.digest for policy in chosen] == [candidates[i].digest for i in order[:count]]
    config = DistillConfig(teacher=DIGITS_MODEL, data=DataConfig("digits"), output="", mode="detrimental",
                           policies_per_batch=2)
    chosen = _training_policies(3, candidates, sim, None, None, None, config, "sample")
    assert chosen == [candidates[2], candidates[3]]


def test_refreshed_turn_returns_the_worst_policy_of_both_agents_as_ort_scores_it(digits, digits_data):
    """With refresh, a turn also searches with a fresh agent: the pool gains its leaders, and the policy returned is
    the one of the whole pool that ORT (at batch size 1, on the held-out images) scores lowest, at its accuracy.
    The final turn of a run without refresh searches with the fresh agent all the same."""
    space = _digits_space(digits)
    probe = digits_data[0].subset(120)
    sim = SimModel(digits).eval()
    features = layer_features(space.searched, [sim.quant_layer(x.name).weight.detach().numpy() for x in space.searched])
    drop = np.ones((len(space.searched), 2))
    turns = {}
    for refresh, final in ((False, False), (True, False), (False, True)):
        torch.manual_seed(0)
        policy_round = _PolicyRound(PolicyAgent(space, features, drop, Objective.WORST), space, features, probe, 1,
                                    refresh, 30, np.random.default_rng(0))
        policy, sim_accuracy = policy_round(sim, 2, final=final)
        turns[refresh, final] = policy_round.pool, policy.digest
    (carried, _), (refreshed, worst), (final_pool, final_worst) = turns.values()
    assert set(carried) < set(refreshed) == set(final_pool)
    assert final_worst == worst
    # the fresh search spends the audit's budget of distinct policies, and its board leads with the worst of them
    memo = {}
    evaluator = SimEvaluator(sim, probe, 1, space, lambda records: None, memo)
    board = policy_round._fresh_search(sim, evaluator)
    assert evaluator.evaluations == len(memo) == 30
    assert board.ranked[0].sim_accuracy == min(memo.values())
    scored = {digest: float(np.mean(ort_labels(quantize(digits, space.policy(choice)).proto, probe.x, 1) == probe.y))
              for digest, choice in refreshed.items()}
    assert sim_accuracy == pytest.approx(min(scored.values()))
    assert scored[worst] == pytest.approx(sim_accuracy)


def test_exported_student_runs_on_ort_as_the_trained_weights_say(tmp_path, digits, digits_data):
    """Changed weights survive the export: ORT on student.onnx gives the simulator's fp32 logits, and the
    graph is the teacher's with only layer initializers replaced."""
    sim = SimModel(digits)
    with torch.no_grad():
        for name in sim.layer_names:
            layer = sim.quant_layer(name)
            layer.weight.mul_(-0.5).add_(0.01)
            if layer.bias is not None:
                layer.bias.add_(0.3)
    proto = export_student(digits, sim)
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in digits.proto.graph.node]
    layer_tensors = {layer.weight_name for layer in digits.layers}
    changed = {a.name for a, b in zip(proto.graph.initializer, digits.proto.graph.initializer) if a.raw_data != b.raw_data}
    assert layer_tensors <= changed
    x = digits_data[1].x[:64]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run(None, {digits.input_name: x})
    with torch.no_grad():
        sim_logits = sim(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_logits, sim_logits, rtol=1e-4, atol=1e-4)


def test_rl_search_keeps_admitted_probes_when_evaluations_run_out(tmp_path, digits, digits_data):
    """With fewer evaluations than the sensitivity probes, the search still has candidates: the probes."""
    space = SearchSpace(digits.layers, load_policy("w8a8").resolve(digits.layers), (4, 8),
                        [layer.name for layer in digits.layers], Budget.from_average_bits(6.0, digits.total_macs))
    sim = SimModel(digits).eval()
    evaluator = SimEvaluator(sim, digits_data[1].subset(100), 1, space, lambda records: None, {})
    evaluator.start_count(2)
    board = Leaderboard(Objective.WORST, 3)
    features = layer_features(space.searched, [sim.quant_layer(x.name).weight.detach().numpy() for x in space.searched])
    drop = probe_sensitivity(space, evaluator, Objective.WORST, board)
    rl_search(space=space, evaluator=evaluator, board=board, objective=Objective.WORST, max_evaluations=2, seed=0,
              features=features, progress=lambda *a: None, sensitivity=drop)
    assert evaluator.evaluations == 2
    assert board.entries
    assert all(space.budget.admits(c.bitops, Objective.WORST) for c in board.ranked)


def test_simulator_moves_its_folded_constants_with_it(digits, digits_data):
    """.double() (like .to(device)) reaches the folded constants too: the whole graph runs in float64."""
    sim = SimModel(digits).double()
    assert all(v.dtype == torch.float64 for v in sim._constants.values() if v.is_floating_point())
    with torch.no_grad():
        out = sim(torch.from_numpy(digits_data[1].x[:8]).double())
    assert out.dtype == torch.float64


def _ort_accuracy(path: Path, dataset, policy_file: Path | None = None) -> float:
    model = load_model(path)
    proto = model.proto if policy_file is None else quantize(model, load_policy(str(policy_file)).resolve(model.layers)).proto
    return float(np.mean(ort_labels(proto, dataset.x, 1) == dataset.y))


@pytest.mark.parametrize("mode", ["detrimental", "robust"])
def test_short_distillation_on_the_digits_model(tmp_path, digits, digits_data, mode):
    """A run per mode with the default training settings: the student keeps the teacher's fp32 accuracy and moves the
    quantized one the way its mode asks; every number in summary.json is re-measured here on ORT from the files."""
    train, test = digits_data
    out = tmp_path / mode
    # the training settings are the defaults, the same as for ResNet-20: only the agent's and the audit's work is cut
    config = DistillConfig(teacher=DIGITS_MODEL, data=DataConfig("digits"), output=str(out), mode=mode,
                           policy_limit=200, policy_steps=3, audit_evaluations=45)
    summary = run_distill(config, digits, train, test, progress=False, echo=lambda line: None).to_dict()

    assert summary["student_fp32_accuracy"] == pytest.approx(_ort_accuracy(out / "student.onnx", test))
    assert summary["student_policy_accuracy"] == pytest.approx(
        _ort_accuracy(out / "student.onnx", test, out / "policy.yaml"))
    assert summary["audit"]["worst_accuracy"] == pytest.approx(
        _ort_accuracy(out / "student.onnx", test, out / "audit" / "worst.yaml"))
    assert summary["teacher_fp32_accuracy"] == pytest.approx(_ort_accuracy(Path(DIGITS_MODEL), test))
    policy = load_policy(str(out / "policy.yaml")).resolve(digits.layers)
    assert policy.bitops(digits.layers) >= Budget.from_average_bits(6.0, digits.total_macs).bitops
    assert summary["sim_top1_agreement_with_ort"] == 1.0
    records = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, config.setting("epochs") + 1))

    # 3 points are 16 of the 540 test images; the balance cannot see a smaller gap: the teacher scores 100% on the
    # held-out training images it watches
    assert abs(summary["fp32_gap_points"]) <= 3.0
    teacher_drop = 100 * (summary["teacher_fp32_accuracy"] - summary["teacher_policy_accuracy"])
    if mode == "detrimental":
        # the teacher barely notices this policy; the student trained against it collapses under it
        assert summary["policy_drop_points"] >= 30.0 > teacher_drop + 10
        assert summary["audit"]["drop_points"] >= 30.0
    else:
        assert summary["policy_drop_points"] <= 1.0
        assert summary["audit"]["drop_points"] <= 2.0


@pytest.mark.parametrize("threshold, expected", [(100.0, "light"), (-100.0, "full")])
def test_auto_hardening_follows_the_teachers_worst_case_and_leaves_the_random_stream(tmp_path, digits, digits_data,
                                                                                   monkeypatch, threshold, expected):
    """--hardening auto trains full hardening where the teacher's held-out worst case (no loss on the digits model)
    exceeds the threshold and light where not; its student is, bit for bit, the one that hardening given by name
    trains (the measurement draws on its own random generators); and a full student's exported weights are on the
    4-bit grid (NumPy), a light one's not."""
    import ptqaudit.distill as distill_module

    monkeypatch.setattr(distill_module, "AUTO_HARDENING_POINTS", threshold)
    train, test = digits_data
    printed: list[str] = []

    def distil(name: str, hardening: str) -> Path:
        config = DistillConfig(teacher=DIGITS_MODEL, data=DataConfig("digits"), output=str(tmp_path / name),
                               mode="robust", hardening=hardening, epochs=1, train_limit=300, min_epoch_batches=5,
                               policy_limit=100, policy_steps=1, audit_evaluations=20)
        summary = run_distill(config, digits, train, test.subset(100), progress=False, echo=printed.append)
        assert summary.hardening == expected
        return tmp_path / name / "student.onnx"

    auto = distil("auto", "auto")
    assert any(line.startswith(f"hardening {expected}: under the worst policy found") for line in printed)
    assert auto.read_bytes() == distil("named", expected).read_bytes()
    student = load_model(auto)
    on_grid = [np.allclose(k, np.round(k), atol=1e-4) for k in
               (_on_grid(w.detach().numpy(), 4) for w in _layer_weights(SimModel(student), student.layers))]
    assert on_grid == [expected == "full"] * len(student.layers)


def test_cli_distill_prints_the_table_and_writes_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", DIGITS_MODEL, "--mode", "robust", "--epochs", "1", "--min-epoch-batches", "10",
              "--audit-evaluations", "45", "--policy-steps", "1", "--equalize", "--kure", "0.1", "--range-reg", "0.1",
              "--hardening", "full", "--no-progress", "-o", str(out)])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for row in ("teacher fp32", "student fp32", "student under its policy", "student w8a8", "fresh search's worst"):
        assert row in printed
    assert "cross-layer equalization of" in printed and "hardening full |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert f"{100 * summary['student_policy_accuracy']:.2f}%" in printed
    assert yaml.safe_load((out / "policy.yaml").read_text())["layers"]
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", DIGITS_MODEL, "--mode", "robust", "-o", str(out)])
    assert exit_info.value.code == 2 and "already holds a run" in capsys.readouterr().err


def test_interrupted_distillation_resumes_to_the_uninterrupted_result(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the third epoch: exit 130 with the command to continue, a checkpoint of epoch 2 and its two trace
    records; --resume then ends where an uninterrupted run ends: the same student, bit for bit, the same policy and
    the same records (but their times)."""
    import ptqaudit.distill as distill_module

    # 300 images make 3 batches of up to 128 per pass: an epoch of at least 5 is two passes, the second in a new order
    argv = ["distill", DIGITS_MODEL, "--mode", "robust", "--epochs", "3", "--train-limit", "300", "--min-epoch-batches",
            "5", "--policy-limit", "100", "--policy-steps", "1", "--audit-evaluations", "20", "--limit", "100",
            "--no-progress"]

    def run(*extra) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *map(str, extra)])
        printed = capsys.readouterr()
        return exit_info.value.code, printed.out + printed.err

    code, printed = run("-o", tmp_path / "whole")
    assert code == 0 and "hardening light: " in printed  # --hardening auto: the digits teacher loses nothing
    real, calls = distill_module._candidate_policies, {"n": 0}

    def interrupt_in_epoch_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 5 + 2:  # two passes over 300 images make 5 batches of up to 128; the 2nd of epoch 3
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "_candidate_policies", interrupt_in_epoch_three)
    code, err = run("-o", tmp_path / "cut")
    assert code == 130 and "--resume" in err
    records = [json.loads(line) for line in (tmp_path / "cut" / "trace.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and not (tmp_path / "cut" / "summary.json").exists()
    monkeypatch.setattr(distill_module, "_candidate_policies", real)
    code, printed = run("-o", tmp_path / "cut", "--resume")
    assert code == 0, printed
    # the hardening the run began with comes from the checkpoint, not from a new measurement
    assert "after epoch 2/3" in printed and "measuring the teacher's worst case" not in printed

    def without_times(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run_dir / "trace.jsonl").read_text().splitlines()]

    assert without_times(tmp_path / "cut") == without_times(tmp_path / "whole")
    assert (tmp_path / "cut" / "student.onnx").read_bytes() == (tmp_path / "whole" / "student.onnx").read_bytes()
    assert (tmp_path / "cut" / "policy.yaml").read_text() == (tmp_path / "whole" / "policy.yaml").read_text()
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("whole", "cut")]
    for key in ("student_fp32_accuracy", "student_policy_accuracy", "audit"):
        assert summaries[0][key] == summaries[1][key]

    # a robust run stored before --quant-target existed was distilled toward the teacher: --resume must say so
    run_file = tmp_path / "cut" / "run.json"
    stored = json.loads(run_file.read_text())
    del stored["config"]["quant_target"], stored["config"]["hardening"]
    run_file.write_text(json.dumps(stored))
    code, printed = run("-o", tmp_path / "cut", "--resume")
    assert code == 2 and "settings differ" in printed and "quant_target" in printed
    # and before --hardening existed, the defaults hardened it fully: its checkpoint says nothing of it
    checkpoint_file = tmp_path / "cut" / "checkpoint.pt"
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    del checkpoint["hardening"]
    torch.save(checkpoint, checkpoint_file)
    code, printed = run("-o", tmp_path / "cut", "--resume", "--quant-target", "teacher")
    assert code == 0, printed
    assert "predates --hardening: the run continues with full hardening" in printed


def _short_robust_run(run: Path, capsys):
    """A one-epoch robust distillation of the digits model into `run`, as a function of extra command-line arguments
    that returns its exit code and what it printed on stderr."""
    argv = ["distill", DIGITS_MODEL, "--mode", "robust", "--epochs", "1", "--train-limit", "300", "--policy-limit",
            "100", "--policy-steps", "1", "--no-progress", "-o", str(run)]

    def exit_code(*extra) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *extra])
        return exit_info.value.code, capsys.readouterr().err

    return exit_code


def _interrupt(*args, **kwargs):
    """Stands in for a step of the training loop: Ctrl-C there."""
    raise KeyboardInterrupt


def test_resume_compares_the_mode_settings_as_resolved(tmp_path, capsys, monkeypatch):
    """run.json holds a robust run's mode settings as this version resolves them (the balance at the mode's default,
    not null): under a version whose default differs, --resume is refused naming the setting, and goes on with the
    stored value given by name; a run.json of an earlier version, null for "the mode's default", is taken at today's.
    (A run cut before its first epoch ended: settings that match reach the missing checkpoint.)"""
    import ptqaudit.distill as distill_module

    run = tmp_path / "run"
    exit_code = _short_robust_run(run, capsys)

    monkeypatch.setattr(distill_module, "_candidate_policies", _interrupt)
    assert exit_code()[0] == 130
    run_file = run / "run.json"
    stored = json.loads(run_file.read_text())
    balance = MODE_DEFAULTS["robust"]["balance"]
    assert stored["config"]["balance"] == balance and stored["config"]["hardening"] == "auto"
    monkeypatch.setitem(MODE_DEFAULTS["robust"], "balance", balance + 1)
    code, err = exit_code("--resume")
    assert code == 2 and "settings differ" in err and "balance" in err
    code, err = exit_code("--resume", "--balance", str(balance))
    assert code == 2 and "holds no checkpoint.pt" in err
    stored["config"]["balance"] = None
    run_file.write_text(json.dumps(stored))
    code, err = exit_code("--resume")
    assert code == 2 and "holds no checkpoint.pt" in err


def test_resume_without_a_run_or_a_checkpoint_is_exit_2(tmp_path, capsys, monkeypatch):
    """--resume of a folder with no run, or of a run cut before its first epoch ended (no checkpoint): exit 2,
    saying what is missing; a checkpoint.pt that is not one is refused, not loaded."""
    import ptqaudit.distill as distill_module

    run = tmp_path / "run"
    exit_code = _short_robust_run(run, capsys)

    code, err = exit_code("--resume")
    assert code == 2 and "holds no run to resume" in err

    monkeypatch.setattr(distill_module, "_candidate_policies", _interrupt)
    assert exit_code()[0] == 130
    code, err = exit_code("--resume")
    assert code == 2 and "holds no checkpoint.pt" in err
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, err = exit_code("--resume")
    assert code == 2 and "cannot read" in err
    marker = tmp_path / "code-ran"
    torch.save({"student": _TouchesAFile(marker)}, run / "checkpoint.pt")  # a planted checkpoint that runs code
    code, err = exit_code("--resume")
    assert code == 2 and "cannot read" in err and not marker.exists()


class _TouchesAFile:
    """Unpickled, it would create a file: what a planted checkpoint could do instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_balance_doubles_the_distillation_weight_when_fp32_falls_behind(digits, digits_data):
    """The weight doubles exactly when the student's held-out fp32 accuracy (here the teacher's own, measured
    independently on ORT) is more than the allowed points below the teacher's reference, and halves (not below 1)
    once the gap is under half of them; --balance 0 never moves it."""
    from ptqaudit.distill import _Balance

    probe = digits_data[1].subset(100)
    measured = float(np.mean(ort_labels(digits.proto, probe.x, 1) == probe.y))
    sim = SimModel(digits).eval()
    lines = []

    def balance_against(points: float, reference: float) -> _Balance:
        """A balance whose teacher scored `reference` on the probe (here the same network scores `measured`)."""
        balance = _Balance(points, sim, probe, 1, lines.append)
        assert balance.teacher_accuracy == (pytest.approx(measured) if points else None)
        balance.teacher_accuracy = reference
        return balance

    for points, reference, expected in ((1.0, measured + 0.02, 2.0), (1.0, measured + 0.008, 1.0),
                                        (0.0, measured + 0.5, 1.0)):
        balance = balance_against(points, reference)
        assert balance.check(sim) == pytest.approx(measured)
        assert balance.weight == expected
    assert len(lines) == 1 and "distillation weight raised to 2" in lines[0]
    # a raised weight stays while the gap is between half the allowance and all of it, and halves below that
    for reference, before, after in ((measured + 0.008, 4.0, 4.0), (measured + 0.004, 4.0, 2.0),
                                     (measured, 1.0, 1.0)):
        balance = balance_against(1.0, reference)
        balance.weight = before
        balance.check(sim)
        assert balance.weight == after


@pytest.mark.parametrize("args, message", [
    (["--split", "train"], "distill trains on the train split"),
    (["--bits", "4,40"], "--bits must list widths"),
    (["--budget-avg-bits", "9"], "no policy qualifies"),
    (["--policies-per-batch", "5"], "--policies-per-batch"),
    (["--mode", "detrimental", "--quant-target", "teacher"], "--quant-target is for --mode robust"),
    (["--mode", "detrimental", "--hardening", "light"], "--hardening is for --mode robust"),
])
def test_cli_distill_bad_input_is_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", DIGITS_MODEL, "--mode", "robust", "--no-progress", "-o", str(tmp_path / "r"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where torch sees no CUDA device")
def test_cli_distill_cuda_without_a_device_is_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", DIGITS_MODEL, "--mode", "robust", "--device", "cuda", "-o", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_cli_distill_augment_on_text_is_exit_2(tmp_path, capsys, sst2_root):
    """--augment shifts and mirrors images: asked of a text model and its sentences, it stops with the reason."""
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", str(REPO / "sample_models" / "sst2_lstm.onnx"), "--mode", "robust", "--data", "sst2",
              "--data-root", sst2_root, "--tokenizer", str(REPO / "sample_models" / "sst2_tokenizer.json"),
              "--augment", "--no-progress", "-o", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "--augment shifts and mirrors images" in capsys.readouterr().err
