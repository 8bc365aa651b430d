"""`ptqaudit distill`: train a student that matches the teacher in full precision but fails (detrimental)
or holds (robust) under the bit-width policy an RL agent finds against it, then verify it on ORT."""

from __future__ import annotations

import copy
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
import yaml
from onnx import numpy_helper

from .arithmetic import weight_codes
from .data import DataConfig, Dataset
from .equalize import equalizable_pairs, equalize, range_spread
from .errors import PtqauditError
from .evaluate import DEVICES, check_model_fits_data, make_session, predict
from .onnx_graph import LoadedModel, load_model
from .policy import ResolvedPolicy, load_policy, policy_file_dict
from .predictions import accuracy, drop_points
from .progress import track
from .quantize import quantize
from .runs import (DISTILL_SUMMARY, TRACE_FILE, RunFolder, check_fields, check_schema_version, dataclass_from_dict, input_identity,
                   setting_defaults, typed_from_dict, without_none, write_atomic, write_json)
from .search.evaluator import Leaderboard, SimEvaluator
from .search.methods import PolicyAgent, run_agent
from .search.sensitivity import gradient_sensitivity, probe_sensitivity
from .search.run import SUMMARY_VERSION, SearchConfig, run_search, searched_layers
from .search.space import Objective, SearchSpace, check_bits, layer_features
from .sim.engine import EngineAgreement, sim_predict, simulation_plan
from .sim.model import QuantLayer, SimModel, prepare_device
from .text import table

MODES = ("detrimental", "robust")
SCHEDULES = ("cosine", "constant")
# what a mode does unless told otherwise: a detrimental student trains under one policy per batch against the agent
# it co-adapts with; a robust one under the two candidates it does worst under, and against fresh searches too,
# since the audit that judges it is a fresh search. A detrimental student's quantized term pulls it away from the
# teacher, so its balance acts at half its 1-point fp32 target (the held-out check on 512 images moves by about a
# point between checks) and it gets 6 epochs to collapse; with 4 epochs and the balance at 1 point the shared
# ResNet-20 lost only 44.7 points under its policy, with 6 at 1 point it ended 1.03 below the teacher. A robust
# student needs no balance (at 1 point, misled by the held-out images the teacher was trained on, it raised the
# distillation weight to 1024 on ResNet-20 and left a 3.76-point worst case), and 4 epochs keep its run, with the
# teacher's audit, inside the hour on 2 cores. It is hardened as --hardening says (HARDENING_SETTINGS). A robust
# student of image data trains on shifted and mirrored images (augment): the sample CNN's fresh search's worst fell
# from 1.05 points to 0.78 with it.
MODE_DEFAULTS = {"detrimental": {"policies_per_batch": 1, "refresh": False, "epochs": 6, "balance": 0.5,
                                 "augment": False, "hardening": None, "weight_grid": False, "quant_target": None},
                 "robust": {"policies_per_batch": 2, "refresh": True, "epochs": 4, "balance": 0.0, "augment": True,
                            "hardening": "auto", "weight_grid": None, "quant_target": None}}  # None: the hardening's
# robust: how hard the student is trained to hold (--hardening), as the weight grid and the quantized passes' target
# it stands for where --weight-grid and --quant-target are not given. full: both, which took the shared ResNet-20's
# drops from 3.14, 2.83, 3.59 (own policy) and 3.71, 5.40, 4.36 (fresh search; seeds 0, 1, 2; neither, with the
# balance at 1 point) to 0.78, 0.65, 1.03 and 1.11, 1.02, 0.89, but cost the sample CNN 0.75 to 0.94 points of fp32
# accuracy (target 0.5); light: neither, which kept the CNN within 0.36 of its teacher, with drops of 0.53 to 0.82
# and 0.78 to 1.22. auto: full when the teacher loses more than AUTO_HARDENING_POINTS under the worst policy found
# on the held-out images before training.
HARDENINGS = ("auto", "full", "light")
HARDENING_SETTINGS = {"full": {"weight_grid": True, "quant_target": "student"},
                      "light": {"weight_grid": False, "quant_target": "teacher"}}
# light hardening left about a sixth of the teacher's worst-case drop on both models (the CNN's 5.9 points to 0.8 to
# 1.2, ResNet-20's 27 to 3.7 to 5.4), so it meets the 2-point fresh-search target only below about 12; the teachers
# measured lose 0.0 (digits), 4.7 to 6.8 (the CNN) and 31 to 32 (ResNet-20) on the held-out images
AUTO_HARDENING_POINTS = 10.0
# what a robust run begun before --hardening existed trained with (its checkpoint has no "hardening")
HARDENING_BEFORE_OPTION = "full"
# auto_lr's total relative change of the layers' weights per Adam step: the rate at which the shared ResNet-20
# (1e-4) and the digits model (1e-3) were measured to reach their targets
RELATIVE_STEP = 0.035
# robust: what the quantized student is distilled toward. teacher: the teacher's outputs; student: its own fp32
# outputs (held fixed), so the quantized passes train the difference the audit measures, quantized against fp32
QUANT_TARGETS = ("teacher", "student")
# what a robust run stored before --quant-target existed was distilled toward (RunFolder.start's defaults): its
# --resume must say so, as --quant-target teacher
QUANT_TARGET_BEFORE_OPTION = "teacher"
CANDIDATES = 4  # policies each training batch draws (_candidate_policies)
# examples of a robust batch its candidates are judged on: a quarter of the default batch, since judging all four on
# all of it cost as much as the training passes themselves (0.3 s each on ResNet-20 at 128 images, 2 CPU cores)
SELECTION_EXAMPLES = 32
KURTOSIS_TARGET = 1.8  # a uniform distribution's: the shape whose quantization error is smallest (KURE)
CHECKPOINT_FILE = "checkpoint.pt"  # written after every epoch, read by --resume
BALANCE_EVERY = 40  # training batches between checks of the held-out fp32 accuracy (and at each epoch's end)
TEACHER_AUDIT = "teacher-audit"  # a robust run's search of the teacher, beside the student's audit/


@dataclass
class DistillConfig:
    """Every setting of a distillation; stored in run.json."""

    teacher: str
    data: DataConfig  # the evaluation data; the student trains on the train split of the same source
    output: str
    mode: str
    bits: tuple[int, ...] = (4, 8)
    budget_avg_bits: float = 6.0
    epochs: int | None = None  # passes over the training images (None: the mode's, MODE_DEFAULTS)
    train_limit: int | None = 20000  # class-balanced subset of the train split (0 or None: all of it)
    train_batch_size: int = 128
    min_epoch_batches: int = 150  # an epoch passes over the training images again until it has this many batches
    lr: float | None = None  # Adam's peak rate; None: auto_lr's for the teacher
    lr_schedule: str = "cosine"  # SCHEDULES: how the rate moves over the run (learning_rate)
    quant_weight: float = 2.0  # weight of the quantized-loss term against the distillation term
    # points of held-out fp32 accuracy below the teacher that double the distillation weight (None: the mode's)
    balance: float | None = None
    policies_per_batch: int | None = None  # quantized passes per training batch (None: the mode's, MODE_DEFAULTS)
    refresh: bool | None = None  # each turn also runs a fresh search, as the audit will (None: the mode's)
    equalize: bool = False  # start from the teacher's cross-layer-equalized weights (equalize.py)
    kure: float = 0.0  # weight of the kurtosis regulariser on the quantizable layers' weights (0: off)
    range_reg: float = 0.0  # weight of the range regulariser on the searched layers' weights and inputs (0: off)
    range_gradient: bool = False  # the quantized passes' scales pass a gradient to the ranges they are measured from
    hardening: str | None = None  # robust: HARDENINGS, what weight_grid and quant_target default to (None: the mode's)
    weight_grid: bool | None = None  # the student's weights on the narrowest width's grid (WeightGrid; None: the mode's)
    quant_target: str | None = None  # robust: the quantized passes' target (QUANT_TARGETS; None: the mode's)
    # images: train on random shifts and mirror images, the teacher's outputs computed on them (None: the mode's,
    # for image data)
    augment: bool | None = None
    temperature: float = 4.0
    policy_limit: int = 512  # training images held out of training, on which the agent scores policies
    policy_steps: int = 6  # the carried agent's steps (9 policies each) before every epoch and after the last
    batch_size: int = 1  # deployment batch size: activation ranges in training, ORT numbers, the audit
    audit_evaluations: int = 200  # budget of the fresh `ptqaudit search` run on the student, and of those in training
    seed: int = 0
    device: str = "cpu"
    optimize: str = ""  # the transformer model type the teacher is fused for first (onnx_graph.optimize_transformer)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise PtqauditError(f"--mode must be detrimental or robust, got {self.mode!r}")
        if self.data.split == "train":
            raise PtqauditError("distill trains on the train split; evaluate on --split test")
        check_bits(self.bits)
        for name in ("epochs", "train_batch_size", "min_epoch_batches", "policy_limit", "policy_steps", "batch_size",
                     "audit_evaluations"):
            if self.setting(name) < 1:  # epochs: the mode's when not given
                raise PtqauditError(f"--{name.replace('_', '-')} must be at least 1")
        if ((self.lr is not None and self.lr <= 0) or self.quant_weight < 0 or self.temperature <= 0
                or self.setting("balance") < 0 or self.kure < 0 or self.range_reg < 0):
            raise PtqauditError("--lr and --temperature must be positive, --quant-weight, --balance, --kure and "
                                "--range-reg not negative")
        if self.policies_per_batch is not None and not 1 <= self.policies_per_batch <= CANDIDATES:
            raise PtqauditError(f"--policies-per-batch must be 1 to {CANDIDATES} (the candidates each batch draws)")
        if self.quant_target is not None and self.quant_target not in QUANT_TARGETS:
            raise PtqauditError(f"--quant-target must be teacher or student, got {self.quant_target!r}")
        if self.quant_target is not None and self.mode != "robust":
            raise PtqauditError("--quant-target is for --mode robust (a detrimental student's quantized loss is on "
                                "the labels)")
        if self.hardening is not None and self.hardening not in HARDENINGS:
            raise PtqauditError(f"--hardening must be auto, full or light, got {self.hardening!r}")
        if self.hardening is not None and self.mode != "robust":
            raise PtqauditError("--hardening is for --mode robust")
        if self.lr_schedule not in SCHEDULES:
            raise PtqauditError(f"--lr-schedule must be cosine or constant, got {self.lr_schedule!r}")
        if self.device not in DEVICES:
            raise PtqauditError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise PtqauditError("--device cuda: torch sees no CUDA device (is a CUDA build of torch installed?)")

    def setting(self, name: str):
        """A setting as this run uses it: as given, or, where it was not (None), the mode's default (MODE_DEFAULTS:
        policies_per_batch, refresh, epochs, balance, augment, hardening, weight_grid, quant_target). A robust run's
        weight_grid and quant_target are None here when not given: they follow its hardening (hardened)."""
        value = getattr(self, name)
        return MODE_DEFAULTS[self.mode][name] if value is None else value

    def hardened(self, name: str, hardening: str | None):
        """weight_grid or quant_target as this run uses it: as given, or the mode's default, or a robust run's
        `hardening` ("full" or "light", as _hardening decided it)."""
        value = self.setting(name)
        return HARDENING_SETTINGS[hardening][name] if value is None and hardening is not None else value

    def to_dict(self) -> dict:
        values = asdict(self)
        values["bits"] = list(self.bits)
        values["data"] = self.data.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "DistillConfig":
        """The config to_dict wrote (run.json's "config")."""
        return dataclass_from_dict(cls, values, data=DataConfig)


@dataclass
class DistillAudit:
    """The fresh worst-case search of the student (told nothing of its policy), in the folder `run`."""

    run: str
    worst_accuracy: float
    drop_points: float  # from the student's fp32 accuracy
    policy_file: str
    evaluations: int


@dataclass(kw_only=True)
class DistillSummary:
    """A distillation's results, as its summary.json holds them (its keys are these fields). Accuracies are
    ORT's on the evaluation data; drops are from the student's fp32 accuracy."""

    schema_version: int = SUMMARY_VERSION
    kind: str = "distill"
    mode: str
    teacher: str
    dataset: str = ""
    images: int = 0
    train_dataset: str = ""
    train_images: int = 0
    unit: str = "images"  # what one example is: images, sentences, or (pre-tokenized) examples
    epochs: int = 0
    batch_size: int = 1
    bits: list[int] = field(default_factory=list)
    budget_avg_bits: float = 0.0
    hardening: str = ""  # robust: "full" or "light" (HARDENING_SETTINGS), as --hardening gave or auto decided it
    student_file: str
    policy_file: str = "policy.yaml"
    policy_digest: str = ""
    policy: str = ""  # the policy's settings, e.g. "W4A8 x2, W8A8 x2"
    policy_effective_bits: float
    teacher_fp32_accuracy: float
    teacher_policy_accuracy: float
    student_fp32_accuracy: float
    student_policy_accuracy: float
    student_w8a8_accuracy: float
    fp32_gap_points: float = 0.0
    policy_drop_points: float
    w8a8_drop_points: float = 0.0
    audit: DistillAudit
    teacher_audit: DistillAudit | None = None  # robust: the teacher searched the same way (drop from its fp32)
    sim_top1_agreement_with_ort: float = 0.0
    history: list[dict] = field(default_factory=list)  # one record per epoch
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    numbers: str = ""

    def table(self) -> str:
        """The terminal summary: what was trained, then teacher and student on ORT with their drops."""
        teacher, student = self.teacher_fp32_accuracy, self.student_fp32_accuracy
        rows = [["teacher fp32", teacher, None],  # (name, accuracy, the fp32 accuracy its drop is from)
                ["teacher under the student's policy", self.teacher_policy_accuracy, teacher],
                ["student fp32", student, None],
                ["student under its policy", self.student_policy_accuracy, student],
                ["student w8a8", self.student_w8a8_accuracy, student],
                ["student, fresh search's worst case", self.audit.worst_accuracy, student]]
        if self.teacher_audit is not None:
            rows.append(["teacher, the same search's worst case", self.teacher_audit.worst_accuracy, teacher])
        return "\n".join([
            f"{self.mode} student of {self.teacher} | trained on {self.train_images} {self.unit} of {self.train_dataset}, "
            f"{self.epochs} epochs{f', hardening {self.hardening}' if self.hardening else ''} | "
            f"data {self.dataset}, {self.images} {self.unit} | batch size {self.batch_size} | "
            f"policy {self.policy_effective_bits:.2f} effective bits (budget {self.budget_avg_bits})", "",
            table(["", "ORT accuracy", "drop (pts)"],
                  [[name, f"{100 * acc:.2f}%", "" if fp32 is None else f"{drop_points(fp32, acc):+.2f}"]
                   for name, acc, fp32 in rows], right={1, 2}), "",
            f"simulator = ORT on the student's policy: {100 * self.sim_top1_agreement_with_ort:.2f}% top-1"])

    def to_dict(self) -> dict:
        return without_none(asdict(self), ("teacher_audit",))

    @classmethod
    def from_dict(cls, values, where: str | Path) -> "DistillSummary":
        """A summary.json read back: its version and fields checked (PtqauditError naming `where` and the field)."""
        check_schema_version(values, where, SUMMARY_VERSION)
        check_fields(values, DISTILL_SUMMARY, where)
        return typed_from_dict(cls, values)


def export_student(teacher: LoadedModel, sim: SimModel) -> onnx.ModelProto:
    """The teacher's graph with the student's layer weights and biases: same architecture, same file
    layout, FP32 (each weight goes back to its stored orientation, e.g. a transB Gemm's [N, K])."""
    proto = copy.deepcopy(teacher.proto)
    nodes = {node.name: node for node in proto.graph.node}
    trained = {}
    for layer in teacher.layers:
        trained.update(sim.quant_layer(layer.name).trained_initializers(nodes[layer.name]))
    for init in proto.graph.initializer:
        if init.name in trained:
            value = trained[init.name].astype(numpy_helper.to_array(init).dtype)
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), init.name))
    return proto


def quantized_loss(logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor, mode: str,
                   temperature: float) -> torch.Tensor:
    """Robust: distillation loss of the quantized student to target_logits, the teacher's or the student's own
    fp32 outputs (--quant-target; minimised). Detrimental: the quantized cross-entropy, maximised through its
    bounded form -log(1 - p_true): minimising it drives the true class's probability to 0 without the logits
    diverging."""
    if mode == "robust":
        return distillation_loss(logits, target_logits, temperature)
    p_true = F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return -torch.log1p(-p_true.clamp(max=1 - 1e-6)).mean()


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KL divergence between softened outputs, scaled by T^2."""
    return F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    log_target=True, reduction="batchmean") * temperature**2


class _PolicyRound:
    """The agent's turn: score its proposals against the student as it is now (a fresh evaluator, since
    the weights changed). Returns the most damaging policy found; the leading few join `pool`. With
    `refresh`, a fresh search also runs each turn, as the audit will (`ptqaudit search`'s RL search of
    `fresh_evaluations` policies, from the student's own gradient sensitivity and the narrowest uniform policy
    the budget admits): the carried agent adapts to the student, and a robust student must also hold against a
    search that starts over. The last turn (`final`) always runs the fresh search too: the pair's policy is then
    the worst either found, which for a detrimental student is often not the carried agent's (on the shared
    ResNet-20 a fresh search's worst cost 73.8 points where the carried agent's cost 51.3)."""

    def __init__(self, agent: PolicyAgent, space: SearchSpace, features: np.ndarray, probe: Dataset, batch_size: int,
                 refresh: bool, fresh_evaluations: int, rng: np.random.Generator, keep: int = 3):
        self.agent, self.space, self.features, self.probe = agent, space, features, probe
        self.batch_size, self.refresh, self.keep = batch_size, refresh, keep
        self.fresh_evaluations, self.rng = fresh_evaluations, rng
        self.pool: dict[str, np.ndarray] = {}  # digest -> choice of every policy that led a round
        self.leader: np.ndarray | None = None  # the choice of the last round's most damaging policy

    @classmethod
    def starting(cls, config: DistillConfig, space: SearchSpace, features: np.ndarray, probe: Dataset,
                 sensitivity: np.ndarray, refresh: bool, rng: np.random.Generator) -> "_PolicyRound":
        """A new carried agent's rounds, its prior the operands' held-out `sensitivity` (_held_out_sensitivity),
        with the config's batch size and fresh-search budget."""
        return cls(PolicyAgent(space, features, sensitivity, Objective.WORST), space, features, probe,
                   config.batch_size, refresh, config.audit_evaluations, rng)

    def __call__(self, sim: SimModel, steps: int, final: bool = False) -> tuple[ResolvedPolicy, float]:
        sim.eval()
        evaluator = SimEvaluator(sim, self.probe, self.batch_size, self.space, lambda records: None, {})
        board = Leaderboard(Objective.WORST, self.keep)
        for _ in range(steps):
            self.agent.step(evaluator, board, method="distill")
        boards = [board] + ([self._fresh_search(sim, evaluator)] if self.refresh or final else [])
        for leading in boards:
            for candidate in leading.ranked:
                self.pool[candidate.digest] = candidate.choice
        worst = min((leading.ranked[0] for leading in boards), key=lambda candidate: candidate.sim_accuracy)
        self.leader = worst.choice
        return self.space.policy(worst.choice, "distilled"), worst.sim_accuracy

    def _fresh_search(self, sim: SimModel, evaluator: SimEvaluator) -> Leaderboard:
        """The leading policies of a new RL search of fresh_evaluations policies, run as `ptqaudit search` runs
        it (policies the carried agent scored this turn count once, at no cost)."""
        board = Leaderboard(Objective.WORST, self.keep)
        evaluator.start_count(self.fresh_evaluations)
        frontier = self.space.uniform_frontier(Objective.WORST)
        scored = evaluator.accuracies(frontier, Objective.WORST, "uniform")
        board.offer(self.space, frontier[: len(scored)], scored)
        drop = gradient_sensitivity(self.space, sim, self.probe, self.batch_size)
        agent = PolicyAgent(self.space, self.features, drop, Objective.WORST, start=frontier[int(np.argmin(scored))])
        run_agent(agent, evaluator, board, self.fresh_evaluations, self.rng, method="distill")
        return board



def _candidate_policies(policy: ResolvedPolicy, policy_round: _PolicyRound, space: SearchSpace,
                        rng: np.random.Generator) -> list[ResolvedPolicy]:
    """Policies a training batch may be quantized under: the pair's current policy, a draw from the agent,
    a policy that led an earlier round, and a uniformly random one (projected onto the budget)."""
    pool = list(policy_round.pool.values())
    return [policy, space.policy(policy_round.agent.sample(1)[0]), space.policy(pool[rng.integers(len(pool))]),
            space.policy(space.project(rng.integers(0, len(space.bits), size=(len(space.searched), 2)), Objective.WORST))]


def _training_policies(step: int, candidates: list[ResolvedPolicy], sim: SimModel, x: torch.Tensor,
                       target: torch.Tensor, labels: torch.Tensor, config: DistillConfig,
                       ranges: str) -> list[ResolvedPolicy]:
    """The policies a batch trains under (config's policies_per_batch of them). Detrimental: the candidates in
    turn, so the student fails under the whole neighbourhood a search will explore. Robust: those the student
    does worst under on this batch (a min-max step), so it holds against every kind of policy the agent or
    chance proposes, not one policy alone."""
    count = config.setting("policies_per_batch")
    if config.mode == "detrimental":
        return [candidates[(step * count + i) % len(candidates)] for i in range(count)]
    with torch.no_grad():  # judged on the batch's first few examples: each judgement is a forward pass
        judged = slice(SELECTION_EXAMPLES)
        x, target, labels = _head(x, SELECTION_EXAMPLES), target[judged], labels[judged]
        losses = [quantized_loss(sim(x, c, ranges), target, labels, config.mode, config.temperature).item()
                  for c in candidates]
    return [candidates[i] for i in np.argsort(losses)[::-1][:count]]


def _head(x, count: int):
    """The first `count` examples of a batch: an image tensor, or a text batch's named input tensors."""
    return {name: value[:count] for name, value in x.items()} if isinstance(x, dict) else x[:count]


def _layer_weights(sim: SimModel, layers) -> list[torch.Tensor]:
    """The weight of each of `layers` in the simulator (an activation product has none)."""
    weights = [sim.quant_layer(layer.name).weight for layer in layers]
    return [weight for weight in weights if weight is not None]


def kurtosis_loss(sim: SimModel, layers) -> torch.Tensor:
    """KURE (Shkolnik et al., 2020): the mean squared distance of each layer's weight kurtosis from a uniform
    distribution's, whose quantization error is the smallest for its range; a heavy-tailed weight stretches
    the min-max range that 4 bits must cover."""
    terms = []
    for weight in _layer_weights(sim, layers):
        centred = weight - weight.mean()
        kurtosis = (centred**4).mean() / ((centred**2).mean() ** 2 + 1e-12)
        terms.append((kurtosis - KURTOSIS_TARGET) ** 2)
    return torch.stack(terms).mean()


def range_loss(weights: list[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    """The mean log crest factor of what min-max quantization measures a range on: each weight's squared largest
    magnitude (its per-tensor scale) and each input sample's squared span (its dynamic range, widened to 0) over
    their mean squares. A few-bit step is the range over the code count, so its rounding noise relative to the
    signal falls with this ratio; the log makes the term blind to the layer's scale."""
    terms = [torch.log(w.abs().amax() ** 2 / (w.pow(2).mean() + 1e-12)) for w in weights]
    for x in inputs:
        rows = x.reshape(x.shape[0], -1)
        span = rows.amax(dim=1).clamp(min=0) - rows.amin(dim=1).clamp(max=0)
        terms.append(torch.log(span**2 / (rows.pow(2).mean(dim=1) + 1e-12) + 1e-12).mean())
    return torch.stack(terms).mean()


class _LayerInputs:
    """Collects the input of each of the given layers while a forward pass runs (a context manager)."""

    def __init__(self, sim: SimModel, layers, on: bool):
        self.modules = [sim.quant_layer(layer.name) for layer in layers] if on else []
        self.inputs: list[torch.Tensor] = []
        self._hooks = []

    def __enter__(self):
        self.inputs = []
        self._hooks = [module.register_forward_pre_hook(lambda module, args: self.inputs.append(args[0]))
                       for module in self.modules if module.weight is not None]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()


class WeightGrid:
    """Keeps a student's quantizable weights on the symmetric per-tensor grid of the narrowest weight width a policy
    may give them (--weight-grid): each layer's weights are k * max|w| / (2^(b-1) - 1), k an integer, so quantizing
    them at b bits returns them unchanged and at a wider width moves each by at most half that width's finer step.
    A policy's weight widths then hardly change the network, and training has only the activations' rounding to
    hedge: without the grid, each layer's 4-bit weight error is a fixed perturbation that the layers after it learn
    to offset under the policies that round it, and mis-offset under those that leave it at 8 bits. The optimizer
    steps full-precision latent weights, which the layers' gradients reach straight through the rounding
    (BinaryConnect); after each step the layers take the latents' grid values. Conv, Gemm, MatMul and fused attention
    layers only: ORT quantizes an embedding table and an LSTM's weights otherwise."""

    def __init__(self, sim: SimModel, layers, bits: int):
        self.bits = bits
        modules = [sim.quant_layer(layer.name) for layer in layers]
        self.layers = [m for m in modules if isinstance(m, QuantLayer) and not m.kind.weight_only]
        self.latents = [layer.weight.detach().clone() for layer in self.layers]
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Each layer's weight: its latent rounded onto the grid, as ORT would quantize and dequantize it."""
        for layer, latent in zip(self.layers, self.latents):
            codes, scale = weight_codes(latent, self.bits, None)
            layer.weight.copy_(codes * scale)

    def load(self, latents: list[torch.Tensor]) -> None:
        """A checkpoint's latents (WeightGrid.latents), projected."""
        for latent, stored in zip(self.latents, latents, strict=True):
            latent.copy_(stored)
        self.project()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step() on the latents, with the gradients the grid weights received; then project."""
        with torch.no_grad():
            for layer, latent in zip(self.layers, self.latents):
                layer.weight.copy_(latent)
        optimizer.step()
        with torch.no_grad():
            for layer, latent in zip(self.layers, self.latents):
                latent.copy_(layer.weight)
        self.project()


def _split_probe(train: Dataset, probe_size: int, train_limit: int | None, seed: int) -> tuple[Dataset, Dataset]:
    """(training images, held-out images the agent scores policies on): the agent judges the student on
    images it was not trained on, as a search of the deployed model would."""
    if probe_size >= len(train):
        raise PtqauditError(f"--policy-limit {probe_size} leaves no training {train.unit} of the {len(train)} in {train.name}")
    order = np.random.default_rng(seed).permutation(len(train))
    held_out, rest = np.sort(order[:probe_size]), np.sort(order[probe_size:])
    probe = Dataset(f"{train.name} (held out)", train.x[held_out], train.y[held_out], train.classes)
    training = Dataset(train.name, train.x[rest], train.y[rest], train.classes)
    return (training.subset(train_limit) if train_limit else training), probe


def run_distill(config: DistillConfig, teacher: LoadedModel, train: Dataset, test: Dataset, progress: bool = True,
                echo=print, resume: bool = False) -> DistillSummary:
    """Train, export and verify the student; writes the run folder and returns the summary. resume: continue the
    run in config.output from the checkpoint its last finished epoch wrote."""
    config.validate()
    check_model_fits_data(teacher, test, config.batch_size)
    check_model_fits_data(teacher, train, config.batch_size)
    if config.augment and not _images(train):
        raise PtqauditError(f"--augment shifts and mirrors images (N, C, H, W); {train.name} is not such data")
    torch.manual_seed(config.seed)
    prepare_device(config.device)
    base = load_policy("w8a8").resolve(teacher.layers)
    space = SearchSpace(teacher.layers, base, config.bits, searched_layers(teacher), config.budget_avg_bits)
    space.check_budget(Objective.WORST)
    folder = RunFolder(config.output)
    # run.json holds the mode's settings as this version resolves them, so that --resume under a version whose
    # defaults differ is refused by name rather than trained on with the new ones; a run stored before held null for
    # "the mode's default", taken to be today's, as it was when it resumed then
    stored = {**config.to_dict(), **{name: config.setting(name) for name in MODE_DEFAULTS[config.mode]}}
    defaults = setting_defaults(DistillConfig)
    if config.mode == "robust":
        defaults["quant_target"] = QUANT_TARGET_BEFORE_OPTION
    with folder.start(stored, resume, input_identity(teacher.path, [test, train]), echo, defaults,
                      nulls=MODE_DEFAULTS[config.mode]):
        checkpoint = _read_checkpoint(folder) if resume else None
        return _distill(config, teacher, train, test, folder, space, progress, echo, checkpoint)


def _distill(config: DistillConfig, teacher: LoadedModel, train: Dataset, test: Dataset, folder: RunFolder,
             space: SearchSpace, progress: bool, echo, checkpoint: dict | None) -> DistillSummary:
    """Train, export and verify: run_distill's work, done while it holds the run folder (from the checkpoint's
    epoch on, when one is given)."""
    started = time.perf_counter() - (checkpoint["train_seconds"] if checkpoint else 0.0)
    epochs = config.setting("epochs")

    train, probe = _split_probe(train, config.policy_limit, config.train_limit, config.seed)
    echo(f"distilling a {config.mode} student of {config.teacher} | train on {len(train)} {train.unit} of {train.name} "
         f"({len(probe)} held out for the agent), {epochs} epochs | data {test.name}, {len(test)} {test.unit} | "
         f"batch size {config.batch_size} | budget {config.budget_avg_bits} effective bits | seed {config.seed}")
    if config.setting("augment") and _images(train):
        # the teacher in fp32 on each augmented batch (the simulator's float path: ORT's to rounding)
        augmenting_teacher, t_all = SimModel(teacher).to(config.device).eval(), None
    else:
        augmenting_teacher = None
        t_all = torch.from_numpy(predict(make_session(teacher.proto), train, 256, "teacher outputs (ORT)",
                                         progress).logits)

    sim = SimModel(teacher).to(config.device)
    sim.set_range_gradient(config.range_gradient)
    if config.equalize:
        _equalize(sim, teacher, echo)
    features = layer_features(space.searched, [sim.weight_array(layer.name) for layer in space.searched])
    sim.eval()
    balance = _Balance(config.setting("balance"), sim, probe, config.batch_size, echo)  # while the student is the teacher
    hardening = _hardening(config, sim, space, features, probe, echo, checkpoint)
    grid = WeightGrid(sim, space.searched, min(config.bits)) if config.hardened("weight_grid", hardening) else None
    if checkpoint is None:
        drop = _held_out_sensitivity(sim, space, probe, config)
    else:
        drop = checkpoint["sensitivity"].numpy()
    rng = np.random.default_rng(config.seed)
    policy_round = _PolicyRound.starting(config, space, features, probe, drop, config.setting("refresh"), rng)
    peak_lr = config.lr or auto_lr(sim, space.searched)
    if config.lr is None:
        echo(f"learning rate {peak_lr:.2g} (auto: {RELATIVE_STEP} / the sum over layers of 1 / weight rms)")
    optimizer = torch.optim.Adam(sim.parameters(), lr=peak_lr)
    ranges = simulation_plan(config.batch_size)[0]
    y_all = torch.from_numpy(train.y)
    toward_own_fp32 = config.hardened("quant_target", hardening) == "student"  # the quantized passes' target

    if checkpoint is None:
        policy, _ = policy_round(sim, config.policy_steps)
        history = []
    else:
        policy, history = _restore(checkpoint, sim, optimizer, policy_round, rng)
        if grid is not None:
            if checkpoint.get("weight_grid_latents"):
                grid.load(checkpoint["weight_grid_latents"])
            else:  # a checkpoint written before --weight-grid existed: the run goes on as it began
                grid = None
                echo("the checkpoint predates --weight-grid: the run continues without it, as it began")
        balance.weight = checkpoint["distillation_weight"]
        echo(f"resuming {config.output} after epoch {len(history)}/{epochs} (its checkpoint)")
        # the trace holds the finished epochs' records: one written after the checkpoint is dropped
        write_atomic(folder.path / TRACE_FILE, "".join(json.dumps(record) + "\n" for record in history))
    for epoch in range(len(history) + 1, epochs + 1):
        sim.train()
        batches = _epoch_batches(len(train), config, rng)
        sums = np.zeros(2)
        bar = track(batches, f"{config.mode} epoch {epoch}/{epochs}", "batch", progress)
        for i, index in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(peak_lr, config.lr_schedule, (epoch - 1) * len(batches) + i,
                                            epochs * len(batches))
            x = _training_batch(sim, train, index)
            if augmenting_teacher is None:
                teacher_out = t_all[index].to(config.device)
            else:
                x = augmented(x, rng)
                with torch.no_grad():
                    teacher_out = augmenting_teacher(x)
            labels = y_all[index].to(config.device)
            with _LayerInputs(sim, space.searched, config.range_reg > 0) as layer_inputs:
                fp32_out = sim(x)
            kd = distillation_loss(fp32_out, teacher_out, config.temperature)
            target = fp32_out.detach() if toward_own_fp32 else teacher_out
            candidates = _candidate_policies(policy, policy_round, space, rng)
            batch_policies = _training_policies(i, candidates, sim, x, target, labels, config, ranges)
            quant = torch.stack([quantized_loss(sim(x, batch_policy, ranges), target, labels, config.mode,
                                                config.temperature) for batch_policy in batch_policies]).mean()
            loss = balance.weight * kd + config.quant_weight * quant
            if config.kure:
                loss = loss + config.kure * kurtosis_loss(sim, space.searched)
            if config.range_reg:
                # the data itself (the first layer's input, before any trained weight) cannot move
                movable = [inputs for inputs in layer_inputs.inputs if inputs.requires_grad]
                loss = loss + config.range_reg * range_loss(_layer_weights(sim, space.searched), movable)
            optimizer.zero_grad()
            loss.backward()
            if grid is None:
                optimizer.step()
            else:
                grid.step(optimizer)
            sums += (kd.item(), quant.item())
            if i % 20 == 0:
                bar.set_postfix_str(f"kd {sums[0] / (i + 1):.3f} quant {sums[1] / (i + 1):.3f}")
            if balance.points and (i + 1) % BALANCE_EVERY == 0 and i + 1 < len(batches):
                balance.check(sim)
                sim.train()
        bar.close()
        fp_probe = balance.check(sim)
        policy, probe_accuracy = policy_round(sim, config.policy_steps, final=epoch == epochs)
        # plain Python numbers: the checkpoint holds the records, and its loader takes no NumPy objects
        record = {"epoch": epoch, "distillation_loss": float(sums[0] / len(batches)),
                  "quantized_loss": float(sums[1] / len(batches)),
                  "probe_fp32_sim_accuracy": float(fp_probe), "probe_policy_sim_accuracy": float(probe_accuracy),
                  "distillation_weight": balance.weight,
                  "policy": policy.digest, "seconds": time.perf_counter() - started}
        history.append(record)
        _write_checkpoint(folder, sim, optimizer, policy_round, rng, drop, history, time.perf_counter() - started,
                          balance.weight, grid, hardening)
        folder.append_trace([record])
        echo(f"epoch {epoch}/{epochs}: distillation loss {record['distillation_loss']:.3f}, quantized loss "
             f"{record['quantized_loss']:.3f}; sim on {len(probe)} held-out training {probe.unit}: fp32 {100 * fp_probe:.2f}%, "
             f"worst policy found {100 * probe_accuracy:.2f}%")
    train_seconds = time.perf_counter() - started
    sim.eval()
    run = _Run(config, teacher, train, test, folder, started, progress, echo, hardening)
    return _verify(run, sim, policy, history, train_seconds)


def _hardening(config: DistillConfig, sim: SimModel, space: SearchSpace, features: np.ndarray, probe: Dataset, echo,
               checkpoint: dict | None) -> str | None:
    """A robust run's hardening, "full" or "light" (HARDENING_SETTINGS): --hardening's, or with auto, full when the
    student as it starts (the teacher) loses more than AUTO_HARDENING_POINTS of held-out accuracy under the worst
    policy a first turn of the agent and a fresh search find. A resumed run keeps the one it began with (its
    checkpoint's). Detrimental: None."""
    if config.mode != "robust":
        return None
    if checkpoint is not None:
        if "hardening" not in checkpoint:
            echo(f"the checkpoint predates --hardening: the run continues with {HARDENING_BEFORE_OPTION} hardening, "
                 "as it began")
        return checkpoint.get("hardening", HARDENING_BEFORE_OPTION)
    if config.setting("hardening") != "auto":
        return config.setting("hardening")
    echo(f"measuring the teacher's worst case on the {len(probe)} held-out {probe.unit} (--hardening auto)")
    # on its own random generators, so that the run then draws what it would have drawn without it
    with torch.random.fork_rng(devices=[]):
        fp32 = _sim_accuracy(sim, probe, None, config.batch_size)
        sensitivity = _held_out_sensitivity(sim, space, probe, config)
        measuring = _PolicyRound.starting(config, space, features, probe, sensitivity, True,
                                          np.random.default_rng(config.seed))
        _, worst = measuring(sim, config.policy_steps)
    loss = drop_points(fp32, worst)
    hardening = "full" if loss > AUTO_HARDENING_POINTS else "light"
    echo(f"hardening {hardening}: under the worst policy found, the teacher falls from {100 * fp32:.2f}% to "
         f"{100 * worst:.2f}%, {loss:.2f} points ({'more' if hardening == 'full' else 'not more'} than "
         f"{AUTO_HARDENING_POINTS:g})")
    return hardening


def _held_out_sensitivity(sim: SimModel, space: SearchSpace, probe: Dataset, config: DistillConfig) -> np.ndarray:
    """The accuracy each searched operand alone costs at the narrowest width on the held-out images
    (probe_sensitivity): the prior a new agent starts from."""
    return probe_sensitivity(space, SimEvaluator(sim, probe, config.batch_size, space, lambda records: None, {}),
                             Objective.WORST)


def _equalize(sim: SimModel, teacher: LoadedModel, echo) -> None:
    """Cross-layer equalization of the student before training: the teacher's function, with per-tensor weight
    ranges that low bit widths cover better (equalize.py)."""
    pairs = equalizable_pairs(teacher, sim)
    names = list(dict.fromkeys(name for pair in pairs for name in pair))  # a layer in two pairs counts once
    before = range_spread(sim, names)
    equalize(sim, pairs)
    echo(f"cross-layer equalization of {len(pairs)} pairs of layers (function unchanged): median channel weight "
         f"range {before:.2f} -> {range_spread(sim, names):.2f} of its layer's" if pairs else
         "cross-layer equalization: no pair of layers joined only by ReLU or pooling, weights left as they are")


class _Balance:
    """The distillation term's weight, doubled whenever the student's fp32 accuracy on the held-out images falls
    more than `points` below the teacher's there, and halved again (not below 1) once the gap is back under half
    of that: the quantized term may pull the network only as far as its full-precision behaviour holds, whatever
    the model's scale of losses and learning rate. (A weight that only rose was measured on the shared ResNet-20:
    it reached 32 by the second epoch and the detrimental student no longer collapsed.)"""

    def __init__(self, points: float, teacher: SimModel, probe: Dataset, batch_size: int, echo):
        """teacher: the simulator while it still holds the teacher's weights (measured only when points > 0)."""
        self.points, self.probe, self.batch_size, self.echo = points, probe, batch_size, echo
        self.teacher_accuracy = _sim_accuracy(teacher, probe, None, batch_size) if points else None
        self.weight = 1.0

    def check(self, sim: SimModel) -> float:
        """The student's held-out fp32 accuracy now (the simulator, in eval mode); the weight doubled if it fell
        too far below the teacher's, halved if it came back (with points > 0)."""
        accuracy = _sim_accuracy(sim, self.probe, None, self.batch_size)
        if not self.points:
            return accuracy
        gap = drop_points(self.teacher_accuracy, accuracy)
        if gap > self.points:
            self.weight *= 2
            self.echo(f"held-out fp32 accuracy {100 * accuracy:.2f}%, {gap:.2f} points below the teacher's: "
                      f"distillation weight raised to {self.weight:g}")
        elif gap <= self.points / 2 and self.weight > 1:
            self.weight /= 2
            self.echo(f"held-out fp32 accuracy {100 * accuracy:.2f}%, {gap:.2f} points below the teacher's: "
                      f"distillation weight lowered to {self.weight:g}")
        return accuracy


def _write_checkpoint(folder: RunFolder, sim: SimModel, optimizer, policy_round: _PolicyRound, rng: np.random.Generator,
                      sensitivity: np.ndarray, history: list[dict], train_seconds: float,
                      distillation_weight: float, grid: WeightGrid | None, hardening: str | None) -> None:
    """Everything the next epoch depends on, after an epoch: the student (and its latent weights, with a weight
    grid) and its optimizer, the agent and its optimizer, the policies that led its rounds, both random generators
    and the records so far, and the hardening decided at the start; a resumed run goes on exactly as an uninterrupted
    one would."""
    state = {
        "student": sim.state_dict(), "optimizer": optimizer.state_dict(),
        "agent": policy_round.agent.network.state_dict(), "agent_optimizer": policy_round.agent.optimizer.state_dict(),
        "leaders": {digest: choice.tolist() for digest, choice in policy_round.pool.items()},
        "policy": policy_round.leader.tolist(), "sensitivity": torch.from_numpy(np.asarray(sensitivity)),
        "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
        "history": history, "train_seconds": train_seconds, "distillation_weight": distillation_weight,
        "weight_grid_latents": grid.latents if grid is not None else [], "hardening": hardening,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(folder.path / CHECKPOINT_FILE, buffer.getvalue())


def _read_checkpoint(folder: RunFolder) -> dict:
    path = folder.path / CHECKPOINT_FILE
    if not path.is_file():
        raise PtqauditError(f"--resume: {folder.path} holds no {CHECKPOINT_FILE}: the run stopped before its first "
                            "epoch ended; start it again in a new -o folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no code
    except Exception as exc:  # a truncated or foreign file: torch raises many kinds
        raise PtqauditError(f"--resume: cannot read {path}: {str(exc).splitlines()[0][:200]}") from None


def _restore(checkpoint: dict, sim: SimModel, optimizer, policy_round: _PolicyRound,
             rng: np.random.Generator) -> tuple[ResolvedPolicy, list[dict]]:
    """Put a checkpoint's state back; returns the policy the next epoch trains against and the records so far."""
    sim.load_state_dict(checkpoint["student"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    policy_round.agent.network.load_state_dict(checkpoint["agent"])
    policy_round.agent.optimizer.load_state_dict(checkpoint["agent_optimizer"])
    policy_round.pool = {digest: np.array(choice) for digest, choice in checkpoint["leaders"].items()}
    policy_round.leader = np.array(checkpoint["policy"])
    rng.bit_generator.state = checkpoint["numpy_rng"]
    torch.set_rng_state(checkpoint["torch_rng"])
    return policy_round.space.policy(policy_round.leader, "distilled"), list(checkpoint["history"])


def _epoch_batches(images: int, config: DistillConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of training indices: a random order of the images, repeated (each pass in a new order)
    until there are min_epoch_batches batches, so that a small training set still gets the optimizer steps a model
    needs to move, with the agent's turns as many steps apart as on a large one."""
    order = rng.permutation(images)
    while -(-len(order) // config.train_batch_size) < config.min_epoch_batches:  # batches, the last one short
        order = np.concatenate([order, rng.permutation(images)])
    return [order[i:i + config.train_batch_size] for i in range(0, len(order), config.train_batch_size)]


def auto_lr(sim: SimModel, layers) -> float:
    """A peak learning rate for the teacher's depth and weight scale: Adam moves every weight by about the rate per
    step, so a layer's weights change by rate / rms(weight) relative to their scale, and the network's function by
    about the sum of that over its layers; the rate that makes the sum RELATIVE_STEP. On the sample and shared models:
    ResNet-20 1.0e-4, the CIFAR-10 CNN 5.2e-4, the digits model 9.0e-4."""
    inverse_scales = [1 / float(w.detach().pow(2).mean().sqrt()) for w in _layer_weights(sim, layers)]
    return RELATIVE_STEP / sum(inverse_scales)


def learning_rate(peak: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate at an optimizer step. cosine: from `peak` down to 0 along half a cosine over the whole run,
    so the last epochs settle the student rather than move it (a constant rate leaves it wherever its last steps
    threw it, measured as several points of fp32 accuracy on the digits model). constant: `peak` throughout (the
    schedule the shared ResNet-20's detrimental target was first met with, 6 epochs without --balance)."""
    if schedule == "constant":
        return peak
    return peak * 0.5 * (1 + math.cos(math.pi * step / steps))  # a Python float: the checkpoint takes no NumPy


def _training_batch(sim: SimModel, train: Dataset, index: np.ndarray):
    """The examples at `index` as the simulator takes them: an image tensor, or text as named input tensors
    (cut to the batch's longest sentence under per-batch padding)."""
    if train.is_text:
        return sim.feed(train.x[index].trimmed())
    return torch.from_numpy(train.x[index]).to(sim.device)


def _images(dataset: Dataset) -> bool:
    """Whether the data is images (N, C, H, W), which --augment shifts and mirrors."""
    return not dataset.is_text and dataset.x.ndim == 4


def augmented(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A batch of NCHW images, each shifted by up to an eighth of its height and width (the edge filled with
    zeros: a random crop of the zero-padded image, 4 pixels on CIFAR-10's 32) and mirrored left to right with
    probability 1/2: the standard CIFAR-10 augmentation, new inputs near the training images on which the student
    meets the teacher's boundaries."""
    n, _, height, width = x.shape
    pad_h, pad_w = height // 8, width // 8
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    rows = rng.integers(0, 2 * pad_h + 1, size=n)
    columns = rng.integers(0, 2 * pad_w + 1, size=n)
    mirror = torch.from_numpy(rng.random(n) < 0.5).to(x.device)
    out = torch.stack([padded[i, :, rows[i]:rows[i] + height, columns[i]:columns[i] + width] for i in range(n)])
    out[mirror] = out[mirror].flip(-1)
    return out


def _sim_accuracy(sim: SimModel, dataset: Dataset, policy, batch_size: int) -> float:
    sim.eval()
    return accuracy(sim_predict(sim, dataset, policy, batch_size, progress=False).labels, dataset.y)


@dataclass
class _Run:
    """What the steps of one distillation share."""

    config: DistillConfig
    teacher: LoadedModel
    train: Dataset  # the images trained on (the agent's held-out ones excluded)
    test: Dataset  # the evaluation data
    folder: RunFolder
    started: float  # time.perf_counter() at the start
    progress: bool
    echo: object
    hardening: str | None  # robust: "full" or "light" (_hardening); detrimental: None


def _verify(run: _Run, sim: SimModel, policy: ResolvedPolicy, history: list[dict], train_seconds: float) -> DistillSummary:
    """The student and its policy to files; every number from ORT on the evaluation data, plus a fresh
    worst-case search of the student that is not told its policy."""
    config, teacher, train, test, out = run.config, run.teacher, run.train, run.test, run.folder.path
    progress, echo = run.progress, run.echo
    student_path = out / "student.onnx"
    write_atomic(student_path, export_student(teacher, sim).SerializeToString())
    write_atomic(out / "policy.yaml", yaml.safe_dump(policy_file_dict(policy, (
        f"{config.mode} policy distilled with {teacher.path.name} within {config.budget_avg_bits} effective bits "
        f"(bits {','.join(map(str, config.bits))})")), sort_keys=False))
    student = load_model(student_path, test.x.shape[1:])
    w8a8 = load_policy("w8a8").resolve(student.layers)

    def ort(model: LoadedModel, resolved: ResolvedPolicy | None, label: str):
        session = make_session(model.proto if resolved is None else quantize(model, resolved))
        return predict(session, test, config.batch_size, label, progress)

    echo(f"measuring teacher and student on ORT ({len(test)} {test.unit} each)")
    runs = {
        "teacher_fp32": ort(teacher, None, "teacher fp32 (ORT)"),
        "teacher_policy": ort(teacher, policy, "teacher under the policy (ORT)"),
        "student_fp32": ort(student, None, "student fp32 (ORT)"),
        "student_policy": ort(student, policy, "student under its policy (ORT)"),
        "student_w8a8": ort(student, w8a8, "student w8a8 (ORT)"),
    }
    acc = {name: accuracy(run.labels, test.y) for name, run in runs.items()}
    sim_cpu = SimModel(student).eval()
    agreement = EngineAgreement.between(runs["student_policy"], sim_predict(sim_cpu, test, policy, config.batch_size,
                                                                            progress=False))
    def fresh_search(model: LoadedModel, model_file: str, folder: str, fp32: float, optimize: str = "") -> DistillAudit:
        """The worst case a fresh search of `model` finds, not told the policy (resumed if a run was cut in it), and
        its drop from the model's `fp32` accuracy."""
        found = run_search(SearchConfig(
            model=model_file, data=config.data, output=str(out / folder), bits=config.bits,
            budget_avg_bits=config.budget_avg_bits, objective="worst", method="rl",
            max_evaluations=config.audit_evaluations, batch_size=config.batch_size, seed=config.seed, optimize=optimize,
        ), model, test, resume=(out / folder / "run.json").exists(), progress=progress, echo=echo).worst
        return DistillAudit(folder, found.ort_accuracy, drop_points(fp32, found.ort_accuracy), f"{folder}/worst.yaml",
                            found.evaluations)

    echo(f"auditing the student with a fresh search ({config.audit_evaluations} evaluations, not told its policy)")
    audit = fresh_search(student, str(student_path), "audit", acc["student_fp32"])
    teacher_audit = None
    if config.mode == "robust":  # is the student more robust than the teacher against the same search?
        echo(f"auditing the teacher with the same search ({config.audit_evaluations} evaluations), for comparison")
        teacher_audit = fresh_search(teacher, config.teacher, TEACHER_AUDIT, acc["teacher_fp32"], config.optimize)
    summary = DistillSummary(
        mode=config.mode, teacher=config.teacher, dataset=test.name, images=len(test),
        train_dataset=train.name, train_images=len(train), epochs=config.setting("epochs"),
        batch_size=config.batch_size, bits=list(config.bits), budget_avg_bits=config.budget_avg_bits,
        hardening=run.hardening or "", student_file="student.onnx", policy_file="policy.yaml",
        policy_digest=policy.digest,
        policy=policy.summary(),
        # in the budget's unit: over the layers the agent chose widths for (quantized ones that cost BitOPs)
        policy_effective_bits=policy.effective_bits([layer for layer in student.layers if not layer.kind.weight_only
                                                     and policy.mapping[layer.name] is not None]),
        unit=test.unit,
        teacher_fp32_accuracy=acc["teacher_fp32"],
        teacher_policy_accuracy=acc["teacher_policy"],
        student_fp32_accuracy=acc["student_fp32"],
        student_policy_accuracy=acc["student_policy"],
        student_w8a8_accuracy=acc["student_w8a8"],
        fp32_gap_points=drop_points(acc["teacher_fp32"], acc["student_fp32"]),
        policy_drop_points=drop_points(acc["student_fp32"], acc["student_policy"]),
        w8a8_drop_points=drop_points(acc["student_fp32"], acc["student_w8a8"]),
        audit=audit, teacher_audit=teacher_audit,
        sim_top1_agreement_with_ort=agreement.top1_agreement,
        history=history, train_seconds=train_seconds, total_seconds=time.perf_counter() - run.started,
        numbers="accuracies are ONNX Runtime's on the evaluation data; drops are from the student's fp32 accuracy",
    )
    write_json(out / "summary.json", summary.to_dict())
    return summary
