"""`ptqaudit search`: budget and projection, methods against brute force on ORT, the run folder, resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from ptqaudit.cli import main
from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import LayerQuant, ResolvedPolicy, load_policy
from ptqaudit.quantize import quantize
from ptqaudit.search.run import SearchConfig, run_search
from ptqaudit.search.space import Budget, Objective, SearchSpace

REPO = Path(__file__).resolve().parent.parent
DIGITS_MODEL = str(REPO / "sample_models" / "digits_cnn.onnx")
SMALL = ("/conv1/Conv", "/MatMul")  # two searched layers: spaces small enough to enumerate here


@pytest.fixture(scope="module")
def digits():
    return load_model(DIGITS_MODEL)


def _space(model, bits=(2, 3, 4, 5, 6, 8), avg_bits=6.0, layers=None):
    base = load_policy("w8a8").resolve(model.layers)
    names = list(layers) if layers else [layer.name for layer in model.layers]
    return SearchSpace(model.layers, base, bits, names, Budget.from_average_bits(avg_bits, model.total_macs))


@pytest.mark.parametrize("objective", list(Objective))
def test_projection_always_lands_inside_the_budget(digits, objective):
    space = _space(digits)
    rng = np.random.default_rng(0)
    for _ in range(300):
        choice = rng.integers(0, len(space.bits), size=(len(space.searched), 2))
        projected = space.project(choice, objective)
        assert space.budget.admits(space.bitops(projected), objective)
        if space.budget.admits(space.bitops(choice), objective):
            assert np.array_equal(projected, choice)  # an admitted policy is left alone
        else:  # only moved in the direction the budget demands
            assert np.all(projected >= choice) if objective == "worst" else np.all(projected <= choice)


def test_space_cost_equals_the_policy_cost(digits):
    space = _space(digits)
    rng = np.random.default_rng(1)
    for _ in range(50):
        choice = rng.integers(0, len(space.bits), size=(len(space.searched), 2))
        policy = space.policy(choice)
        expected = sum(layer.macs * policy.mapping[layer.name].weight_bits * policy.mapping[layer.name].activation_bits
                       for layer in digits.layers)
        assert space.bitops(choice) == expected


def _ort_accuracy(model, policy, dataset) -> float:
    session = ort.InferenceSession(quantize(model, policy).proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"input": dataset.x[i : i + 1]})[0] for i in range(len(dataset))])
    return float(np.mean(logits.argmax(1) == dataset.y))


def _search(tmp_path, model, method, objective, **settings):
    dataset = load_dataset(DataConfig(name="digits", limit=settings.pop("limit", 120)))
    config = SearchConfig(model=DIGITS_MODEL, data=DataConfig(name="digits", limit=len(dataset)),
                          output=str(tmp_path / f"{method}-{objective}"), method=method, objective=objective,
                          **settings)
    return run_search(config, model, dataset, progress=False, echo=lambda m: None).to_dict(), dataset


@pytest.mark.parametrize("objective", ["worst", "best"])
def test_exhaustive_search_finds_the_brute_force_extreme_on_ort(tmp_path, digits, objective):
    """Every policy of a 16-policy space measured on ORT directly: the search's answer is the true extreme."""
    bits, avg = (2, 8), 5.0  # the budget holds the two searched layers; the others stay W8A8
    summary, dataset = _search(tmp_path, digits, "exhaustive", objective, bits=bits, budget_avg_bits=avg,
                               layers=SMALL, verify_top=16, max_evaluations=100)
    searched = [layer for layer in digits.layers if layer.name in ("/conv1/Conv", "/MatMul")]
    budget = Budget.from_average_bits(avg, sum(layer.macs for layer in searched))
    truth = []
    for flat in itertools.product(bits, repeat=4):
        mapping = {layer.name: LayerQuant(8, 8) for layer in digits.layers}
        mapping["/conv1/Conv"], mapping["/MatMul"] = LayerQuant(flat[0], flat[1]), LayerQuant(flat[2], flat[3])
        policy = ResolvedPolicy("brute", mapping)
        cost = sum(layer.macs * mapping[layer.name].weight_bits * mapping[layer.name].activation_bits for layer in searched)
        if (cost >= budget.bitops) if objective == "worst" else (cost <= budget.bitops):
            truth.append(_ort_accuracy(digits, policy, dataset))
    extreme = min(truth) if objective == "worst" else max(truth)
    assert summary[objective]["evaluations"] == len(truth)
    assert summary[objective]["ort_accuracy"] == pytest.approx(extreme)


def test_rl_gets_close_to_the_exhaustive_worst_case(tmp_path, digits):
    """81 policies (bits 2,4,8 on two layers); RL with 30 evaluations, fixed seed."""
    settings = dict(bits=(2, 4, 8), budget_avg_bits=7.95, layers=SMALL, verify_top=1)
    truth, _ = _search(tmp_path, digits, "exhaustive", "worst", max_evaluations=100, **settings)
    found, _ = _search(tmp_path, digits, "rl", "worst", max_evaluations=30, **settings)
    assert found["worst"]["evaluations"] <= 30
    assert found["worst"]["ort_accuracy"] <= truth["worst"]["ort_accuracy"] + 0.02


@pytest.mark.parametrize("method", ["random", "greedy", "rl"])
def test_every_scored_policy_honours_the_budget(tmp_path, digits, method):
    # greedy's best case walks down from 8 bits one operand at a time: it needs more evaluations
    summary, _ = _search(tmp_path, digits, method, "both", max_evaluations=200 if method == "greedy" else 40,
                         budget_avg_bits=5.0)
    budget = summary["budget"]["bitops"]
    records = [json.loads(line) for line in (tmp_path / f"{method}-both" / "trace.jsonl").read_text().splitlines()]
    # each objective starts with the uniform policies on the budget's edge, then the method's own
    assert records and all(r["method"] in ("uniform", method) for r in records)
    assert {r["method"] for r in records} == {"uniform", method}
    for record in records:
        if record["objective"] == "worst" or method != "greedy":  # greedy's best case walks down through the ceiling
            assert (record["bitops"] >= budget) if record["objective"] == "worst" else (record["bitops"] <= budget)
    assert summary["worst"]["ort_accuracy"] <= summary["best"]["ort_accuracy"]
    for objective in ("worst", "best"):
        for candidate in summary[objective]["candidates"]:
            assert (candidate["bitops"] >= budget) if objective == "worst" else (candidate["bitops"] <= budget)


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_run_folder_and_its_policy_files(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = _cli(capsys, "search", DIGITS_MODEL, "--limit", 150, "--search-limit", 100, "--max-evaluations", 24,
                          "--budget-avg-bits", 5, "--no-progress", "--json", "-o", out_dir)
    assert code == 0, err
    summary = json.loads(out)
    assert {p.name for p in out_dir.iterdir()} == {"run.json", "trace.jsonl", "worst.yaml", "best.yaml", "summary.json"}
    run = json.loads((out_dir / "run.json").read_text())
    assert run["config"]["seed"] == 0 and run["config"]["batch_size"] == 1 and "torch" in run["environment"]
    assert summary["batch_size"] == 1 and summary["budget"]["effective_bits"] == pytest.approx(5.0, abs=1e-3)
    # the written worst-case policy, evaluated by `ptqaudit eval`, gives the accuracy the summary states
    code, out, err = _cli(capsys, "eval", DIGITS_MODEL, "--limit", 150, "-p", out_dir / "worst.yaml", "--json", "--no-progress")
    assert code == 0, err
    assert json.loads(out)["results"][0]["accuracy"] == pytest.approx(summary["worst"]["ort_accuracy"])
    policy = yaml.safe_load((out_dir / "best.yaml").read_text())
    assert set(policy["layers"]) == {layer.name for layer in load_model(DIGITS_MODEL).layers}


def test_cli_resume_replays_without_new_evaluations(tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["search", DIGITS_MODEL, "--limit", 100, "--search-limit", 60, "--max-evaluations", 16, "--method", "random",
            "--no-progress", "--json", "-o", out_dir]
    code, first, err = _cli(capsys, *argv)
    assert code == 0, err
    lines = (out_dir / "trace.jsonl").read_text()
    code, again, err = _cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert (out_dir / "trace.jsonl").read_text() == lines  # everything came from the trace
    for objective in ("worst", "best"):
        assert json.loads(again)[objective]["ort_accuracy"] == json.loads(first)[objective]["ort_accuracy"]
    code, _, err = _cli(capsys, *argv)  # same folder without --resume
    assert code == 2 and "--resume" in err
    code, _, err = _cli(capsys, *argv[:-3], "--seed", 5, "--json", "-o", out_dir, "--resume")
    assert code == 2 and "seed" in err


def test_cli_budget_out_of_reach_is_bad_input(tmp_path, capsys):
    code, _, err = _cli(capsys, "search", DIGITS_MODEL, "--bits", "2,3", "--budget-avg-bits", 6, "--objective", "worst",
                        "-o", tmp_path / "r", "--no-progress")
    assert code == 2 and "no policy qualifies" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("batch_size", [1, 20])
def test_dynamic_router_accuracy_reproduced_by_routing_on_ort(tmp_path, capsys, batch_size):
    """Load the saved router and menu, route every input (or batch) ourselves, run each entry's quantized
    graph on ORT: the accuracy must be the summary's; the oracle bounds the router."""
    import torch

    from ptqaudit.search.dynamic import Router, input_features

    out_dir = tmp_path / "run"
    code, out, err = _cli(capsys, "search", DIGITS_MODEL, "--limit", 120, "--search-limit", 80, "--max-evaluations", 24,
                          "--dynamic", "--verify-top", 3, "--batch-size", batch_size, "--no-progress", "--json", "-o", out_dir)
    assert code == 0, err
    summary = json.loads(out)
    model = load_model(DIGITS_MODEL)
    dataset = load_dataset(DataConfig(name="digits", limit=120))
    for objective in ("worst", "best"):
        dynamic = summary[objective]["dynamic"]
        saved = torch.load(out_dir / dynamic["router_file"])
        menu = [load_policy(str(out_dir / name)).resolve(model.layers) for name in saved["menu"]]
        router = Router(input_features(dataset.x[:2]), len(menu))
        router.load_state_dict(saved["state_dict"])
        sessions = [ort.InferenceSession(quantize(model, p).proto.SerializeToString(), providers=["CPUExecutionProvider"])
                    for p in menu]
        hits = 0
        for start in range(0, len(dataset), batch_size):
            x, y = dataset.x[start : start + batch_size], dataset.y[start : start + batch_size]
            features = input_features(x).mean(axis=0, keepdims=True)
            with torch.no_grad():
                entry = int(router(torch.from_numpy(features)).argmax())
            hits += int(np.sum(sessions[entry].run(None, {"input": x})[0].argmax(1) == y))
        assert dynamic["ort_accuracy"] == pytest.approx(hits / len(dataset))
        assert dynamic["routing"] == ("per input" if batch_size == 1 else "per batch")
        if objective == "worst":
            assert dynamic["oracle_sim_accuracy"] <= dynamic["router_sim_accuracy"]
        else:
            assert dynamic["oracle_sim_accuracy"] >= dynamic["router_sim_accuracy"]


def test_sensitivity_prior_leans_the_right_way():
    from ptqaudit.search.sensitivity import sensitivity_prior

    drop = np.array([[10.0, 0.0], [2.0, 5.0]])  # [layers, (weight, activation)] points lost at the lowest width
    for objective, lowest_preferred in ((Objective.WORST, True), (Objective.BEST, False)):
        prior = sensitivity_prior(drop, 4, objective)
        probabilities = np.exp(prior) / np.exp(prior).sum(axis=-1, keepdims=True)
        assert np.allclose(probabilities[0, 1], 0.25)  # insensitive operand: uniform
        most_sensitive = probabilities[0, 0]
        assert (most_sensitive.argmax() == 0) == lowest_preferred and (most_sensitive.argmax() == 3) != lowest_preferred
        assert abs(most_sensitive[0] - most_sensitive[3]) > abs(probabilities[1, 0, 0] - probabilities[1, 0, 3])


def test_interrupted_search_resumes_to_the_uninterrupted_result(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of scoring: exit 130, a folder whose trace is whole lines; --resume then ends
    where an uninterrupted run with the same settings ends."""
    import ptqaudit.search.evaluator as evaluator_module

    argv = ["search", DIGITS_MODEL, "--limit", 100, "--search-limit", 60, "--max-evaluations", 30, "--no-progress", "--json"]
    code, uninterrupted, err = _cli(capsys, *argv, "-o", tmp_path / "whole")
    assert code == 0, err

    real = evaluator_module.sim_predict_many
    calls = {"n": 0}

    def interrupt_on_third_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator_module, "sim_predict_many", interrupt_on_third_call)
    code, _, err = _cli(capsys, *argv, "-o", tmp_path / "cut")
    assert code == 130 and "--resume" in err
    lines = (tmp_path / "cut" / "trace.jsonl").read_text().splitlines()
    assert lines and [json.loads(line)["step"] for line in lines] == list(range(1, len(lines) + 1))
    assert not (tmp_path / "cut" / "summary.json").exists()

    monkeypatch.setattr(evaluator_module, "sim_predict_many", real)
    code, resumed, err = _cli(capsys, *argv, "-o", tmp_path / "cut", "--resume")
    assert code == 0, err
    for objective in ("worst", "best"):
        assert json.loads(resumed)[objective]["policy"] == json.loads(uninterrupted)[objective]["policy"]
        assert json.loads(resumed)[objective]["ort_accuracy"] == json.loads(uninterrupted)[objective]["ort_accuracy"]


def test_search_split_scores_candidates_on_the_other_split(tmp_path, capsys, digits):
    """With --search-split train the simulator scores candidates on training images; ORT on those
    images reproduces the recorded scores, and the reported numbers come from the test split."""
    code, out, err = _cli(capsys, "search", DIGITS_MODEL, "--search-split", "train", "--search-limit", 200,
                          "--max-evaluations", 24, "--no-progress", "--json", "-o", tmp_path / "run")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["search_dataset"] == "digits/train" and summary["search_images"] == 200
    assert summary["dataset"] == "digits/test" and summary["images"] == len(load_dataset(DataConfig(name="digits")))
    train = load_dataset(DataConfig(name="digits", split="train", limit=200))
    for objective in ("worst", "best"):
        candidate = summary[objective]["candidates"][0]
        policy = ResolvedPolicy("candidate", {name: LayerQuant(int(label[1:label.index("A")]), int(label[label.index("A") + 1:]))
                                              for name, label in candidate["layers"].items()})
        assert _ort_accuracy(digits, policy, train) == pytest.approx(candidate["sim_accuracy_search_subset"])


# --- --max-evaluations is a hard cap ------------------------------------------------------------------------

from ptqaudit.errors import PtqauditError  # noqa: E402
from ptqaudit.search.methods import METHODS  # noqa: E402


def _scored_policies(run: Path, objective: str) -> tuple[int, int]:
    """(records, distinct policies) of one objective in a run's trace, told apart by their per-layer
    settings as written there (not by the digest the evaluator computed)."""
    trace = run / "trace.jsonl"  # none when the search was refused before scoring anything
    records = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    settings = [json.dumps(r["policy"], sort_keys=True) for r in records if r["objective"] == objective]
    return len(settings), len(set(settings))


@pytest.mark.parametrize("cap", [1, 7, 30])
@pytest.mark.parametrize("method", METHODS)
def test_max_evaluations_is_a_hard_cap(tmp_path, tiny_digits_model, method, cap):
    """Methods ask for policies in groups (RL's 1 + 2 x layers probes and groups of 9, random's 16, greedy's
    moves, exhaustive's whole space); however they group them, no search scores more than the cap."""
    model = load_model(tiny_digits_model)
    data = DataConfig(name="digits", limit=40)
    dataset = load_dataset(data)
    # exhaustive: 81 policies, of which the budget admits 21 (worst case) and 60 (best case)
    bits = (2, 4, 8) if method == "exhaustive" else (2, 3, 4, 5, 6, 8)
    for objective in ("worst", "best"):
        out = tmp_path / objective
        config = SearchConfig(model=str(tiny_digits_model), data=data, output=str(out), method=method,
                              objective=objective, max_evaluations=cap, bits=bits, budget_avg_bits=5.0, verify_top=1)
        try:
            summary = run_search(config, model, dataset, progress=False, echo=lambda m: None).to_dict()
        except PtqauditError as exc:  # too few evaluations to find a policy in the budget, or to be exhaustive
            assert "--max-evaluations" in str(exc), exc
            summary = None
        records, distinct = _scored_policies(out, objective)
        assert records == distinct <= cap  # and none scored twice
        if summary is not None:
            assert distinct == summary[objective]["evaluations"]
        if method == "random":
            assert distinct == cap  # it stops at the cap, not before it


def test_exhaustive_search_refuses_a_space_larger_than_the_cap(tmp_path, tiny_digits_model):
    """Rather than a partial enumeration passed off as exhaustive; the message says how many policies."""
    model = load_model(tiny_digits_model)
    space = _space(model, bits=(2, 4, 8), avg_bits=5.0)
    admitted = sum(space.budget.admits(space.bitops(np.array(flat).reshape(2, 2)), Objective.WORST)
                   for flat in itertools.product(range(3), repeat=4))
    data = DataConfig(name="digits", limit=40)
    config = SearchConfig(model=str(tiny_digits_model), data=data, output=str(tmp_path / "run"), method="exhaustive",
                          objective="worst", max_evaluations=admitted - 1, bits=(2, 4, 8), budget_avg_bits=5.0)
    with pytest.raises(PtqauditError, match=f"would score {admitted} policies .* more than --max-evaluations {admitted - 1}"):
        run_search(config, model, load_dataset(data), progress=False, echo=lambda m: None)
    config.max_evaluations, config.output = admitted, str(tmp_path / "run2")
    summary = run_search(config, model, load_dataset(data), progress=False, echo=lambda m: None).to_dict()
    assert summary["worst"]["evaluations"] == admitted == _scored_policies(tmp_path / "run2", "worst")[1]


def test_rl_step_cut_by_the_cap_learns_only_from_what_was_scored(tiny_digits_model):
    """A group cut to one scored sample leaves the agent as it was (no reward to compare it with); cut to
    five, the agent learns from those five, and its parameters stay finite."""
    import torch

    from ptqaudit.search.evaluator import Leaderboard, SimEvaluator
    from ptqaudit.search.methods import PolicyAgent
    from ptqaudit.sim.model import SimModel

    model = load_model(tiny_digits_model)
    space = _space(model, avg_bits=5.0)
    records = []
    evaluator = SimEvaluator(SimModel(model).eval(), load_dataset(DataConfig(name="digits", limit=40)), 1, space,
                             records.extend, {})
    torch.manual_seed(0)
    agent = PolicyAgent(space, np.zeros((2, 3), dtype=np.float32), np.zeros((2, 2)), Objective.WORST)
    board = Leaderboard(Objective.WORST, 20)

    def parameters():
        return torch.cat([p.detach().flatten().clone() for p in agent.network.parameters()])

    before = parameters()
    evaluator.start_count(1)
    assert agent.step(evaluator, board) == agent.group + 1  # requested
    assert evaluator.evaluations == len(records) == len(board.entries) == 1
    assert torch.equal(parameters(), before)

    evaluator.start_count(5)
    agent.step(evaluator, board)
    assert evaluator.evaluations == 5 and len(records) <= 6
    after = parameters()
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def test_objective_admits_and_ranks_as_its_definition_says():
    """Worst: a floor, lower accuracy sought; best: a ceiling, higher accuracy sought."""
    rng = np.random.default_rng(3)
    for cost, budget, a, b in rng.integers(0, 5, size=(200, 4)):
        assert Objective.WORST.admits(cost, budget) == (cost >= budget)
        assert Objective.BEST.admits(cost, budget) == (cost <= budget)
        assert Objective.WORST.better(a, b) == (a < b) and Objective.BEST.better(a, b) == (a > b)
    values = rng.random((4, 6))
    assert np.array_equal(Objective.WORST.extreme(values, axis=0), values.min(axis=0))
    assert np.array_equal(Objective.BEST.extreme(values, axis=0), values.max(axis=0))
    items = [("a", 0.5), ("b", 0.2), ("c", 0.9), ("d", 0.2), ("e", 0.9)]
    assert Objective.WORST.pick(items, lambda i: i[1]) == ("b", 0.2)  # the first among equals
    assert Objective.BEST.pick(items, lambda i: i[1]) == ("c", 0.9)
