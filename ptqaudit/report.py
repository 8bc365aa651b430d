"""`ptqaudit report`: the audit's headline, the release gate and the vulnerability analysis, as Markdown,
self-contained HTML (plots embedded), JSON or JUnit XML."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

from .analysis import Analysis, BudgetPoint, SearchRun, ShipPolicy, case_under_kernels
from .kernels import kernel_source
from .search.run import UniformBaseline
from .search.space import OBJECTIVES, Objective
from .distill import DistillSummary
from .errors import PtqauditError
from .gate import Check, Gate, GateResult
from .predictions import drop_points
from .text_data import is_text_source

FORMATS = ("md", "html", "json", "junit")


RUN_RECORDS = ("run.json", "summary.json", "trace.jsonl", "analysis.json")
RUN_FILE_SUFFIXES = (".yaml", ".yml", ".pt", ".onnx")  # policies, routers, a distilled student


def report_inputs(run_dir: str | Path, run: SearchRun) -> list[Path]:
    """The files a report reads or may read: the run folders' records, policies, routers and models, the
    model, and a data file. Its output must not replace one of them."""
    files = [run.model.path, Path(run.data.name)]
    for folder in {Path(run_dir), run.path}:
        files += [p for p in folder.iterdir() if p.name in RUN_RECORDS or p.suffix in RUN_FILE_SUFFIXES]
    return files


@dataclass(kw_only=True)
class Headline:
    """The figures an engineer decides on, all over the run's whole evaluation data: ORT's for this machine's
    kernel family, the simulator's emulation for the others of the fleet."""

    model: str
    dataset: str
    images: int
    batch_size: int
    budget_effective_bits: float
    bits: list[int]
    method: str
    fp32_accuracy: float
    worst_accuracy: float  # the fleet's lowest
    worst_drop_points: float
    best_accuracy: float | None  # None: the best case was not searched
    spread_points: float | None
    engine_agreement: float  # simulator = ORT, top-1, lowest over the verified candidates
    worst_policy: dict[str, str]  # layer name -> setting label
    worst_policy_file: str
    gate: GateResult
    kernel_family: str = ""  # the searching machine's, whose ORT kernels measured the run
    kernels: dict[str, str] = field(default_factory=dict)  # the fleet: family -> ORT or emulated
    worst_by_kernels: dict[str, float] = field(default_factory=dict)
    best_by_kernels: dict[str, float] = field(default_factory=dict)
    worst_uniform: UniformBaseline | None = None  # the run's most extreme uniform policies, on the run's kernels
    best_uniform: UniformBaseline | None = None
    unit: str = "images"  # what one example is: images, sentences, or (pre-tokenized) examples
    scenario: str = ""  # text: the padding scenario, in words

    @property
    def shows_kernels(self) -> bool:
        return list(self.kernels) not in ([], [self.kernel_family])


def _padding_scenario(run: SearchRun) -> str:
    """A text run's padding, as its data settings give it (pre-tokenized data is fed as it is)."""
    if not run.model.is_text:
        return ""
    if not is_text_source(run.data.name):
        return "as the .npz holds it"
    text = run.data.text
    return (f"each batch padded to its longest sentence, truncated at {text.max_length} tokens"
            if text.padding == "longest" else f"every sentence padded to {text.max_length} tokens")


def headline(run: SearchRun, gate: Gate, kernels: tuple[str, ...] | None = None, progress: bool = True) -> Headline:
    """kernels: the fleet to report (None: the run's); a family the run did not measure is measured here
    (ORT's kernels when it is this machine's, else the simulator's emulation) over the whole evaluation data."""
    summary = run.summary
    if summary.worst is None:
        raise PtqauditError(f"{run.path} has no worst case (searched with --objective best): the report and the gate "
                            "need it; search with --objective worst or both")
    fleet = dict(summary.kernels) or {summary.kernel_family or "unrecorded": "ORT"}  # older runs name none
    by_kernels = {objective: dict(case.kernels) or {next(iter(fleet)): case.ort_accuracy}
                  for objective in OBJECTIVES if (case := summary.case(objective)) is not None}
    if kernels is not None:
        missing = [family for family in kernels if family not in fleet]
        for objective, measured in by_kernels.items():
            measured.update(case_under_kernels(run, Objective(objective), missing, progress))
        fleet = {family: fleet.get(family) or kernel_source(family) for family in kernels}
        by_kernels = {objective: {family: measured[family] for family in kernels} for objective, measured in by_kernels.items()}
    fp32, worst = summary.fp32_accuracy, min(by_kernels["worst"].values())
    best = min(by_kernels["best"].values()) if "best" in by_kernels else None
    return Headline(
        model=str(run.model.path), dataset=summary.dataset, images=summary.images, batch_size=summary.batch_size,
        budget_effective_bits=summary.budget["effective_bits"], bits=summary.bits, method=summary.method,
        fp32_accuracy=fp32, worst_accuracy=worst, worst_drop_points=drop_points(fp32, worst),
        best_accuracy=best, spread_points=None if best is None else drop_points(best, worst),
        engine_agreement=min(c.sim_top1_agreement_with_ort for case in summary.cases for c in case.candidates),
        worst_policy=summary.worst.policy, worst_policy_file=str(run.path / summary.worst.policy_file),
        gate=gate.result(fp32, worst), kernel_family=summary.kernel_family, kernels=fleet,
        worst_by_kernels=by_kernels["worst"], best_by_kernels=by_kernels.get("best", {}),
        unit=("images" if not run.model.is_text else "sentences" if is_text_source(run.data.name) else "examples"),
        scenario=_padding_scenario(run),
        worst_uniform=summary.worst.uniform, best_uniform=summary.best.uniform if summary.best else None)


DISTILL_FIGURES = ("mode", "hardening", "teacher", "teacher_fp32_accuracy", "teacher_policy_accuracy",
                   "student_fp32_accuracy", "student_policy_accuracy", "student_w8a8_accuracy", "policy_drop_points",
                   "policy_effective_bits", "audit", "teacher_audit")


@dataclass
class Report:
    """The whole report as data: what the JSON format prints and the other formats render."""

    headline: Headline
    analysis: Analysis | None  # None with --no-analysis
    run: str  # the run folder
    distill: DistillSummary | None = None  # when the run is a distillation's

    def to_dict(self) -> dict:
        document = {"headline": asdict(self.headline), "analysis": self.analysis and self.analysis.to_dict(),
                    "run": self.run}
        if self.distill is not None:
            figures = {key: getattr(self.distill, key) for key in DISTILL_FIGURES}
            document["distill"] = {key: asdict(value) if is_dataclass(value) else value
                                   for key, value in figures.items() if value is not None}
        return document


def build(run: SearchRun, gate: Gate, analysis: Analysis | None, kernels: tuple[str, ...] | None = None,
          progress: bool = True) -> Report:
    return Report(headline(run, gate, kernels, progress), analysis, str(run.path), run.distill)


# --- plots -------------------------------------------------------------------------------------------

def plots(report: Report) -> dict[str, bytes]:
    """PNG plots of the analysis (none without one): name -> PNG bytes."""
    analysis = report.analysis
    if not analysis:
        return {}
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figures = {}
    images = f"ORT, {_images(analysis, report.headline)}"

    def save(name, fig):
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        figures[name] = buffer.getvalue()

    rows = analysis.layer_sensitivity
    if rows:
        layers = list(dict.fromkeys(r.layer for r in rows))
        drops = {(r.layer, r.bits): r.drop_points for r in rows}
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers)), 4))
        for bits in sorted({r.bits for r in rows}):
            ax.plot(range(len(layers)), [drops[layer, bits] for layer in layers], marker="o", label=f"W{bits}A{bits}")
        ax.set_xticks(range(len(layers)), [_short(layer) for layer in layers], rotation=70, fontsize=7)
        ax.set_ylabel("accuracy drop (points)")
        set_title(ax, f"Per-layer sensitivity: one layer at low bits, the rest at the base policy ({images})")
        ax.legend(fontsize=8)
        save("sensitivity", fig)

    curves = analysis.budget_curves
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for objective, style in (("worst", "v-"), ("best", "^-")):
            points = curves.get(objective, [])
            if points:
                ax.plot([p.budget_effective_bits for p in points], [100 * p.ort_accuracy for p in points], style,
                        label=f"{objective} case")
        ax.axhline(100 * analysis.fp32_accuracy, color="gray", linestyle="--", label="fp32")
        ax.set_xlabel("budget (effective bits)")
        ax.set_ylabel("ORT accuracy (%)")
        set_title(ax, f"Accuracy versus budget ({images})")
        ax.legend(fontsize=8)
        save("budget", fig)

    classes = analysis.per_input.per_class
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(classes)), 3.5))
    ax.bar([c.class_name for c in classes], [c.drop_points for c in classes], color="#c0392b")
    ax.set_ylabel("drop under the worst policy (points)")
    set_title(ax, f"Per-class accuracy drop ({images})")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    save("per_class", fig)

    sizes = analysis.batch_sizes
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([s.batch_size for s in sizes], [100 * s.worst_accuracy for s in sizes], "o-", label="worst case")
    ax.axhline(100 * analysis.fp32_accuracy, color="gray", linestyle="--", label="fp32")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("ORT accuracy (%)")
    set_title(ax, f"Accuracy versus batch size ({images})")
    ax.legend(fontsize=8)
    save("batch_size", fig)

    corruption_rows = analysis.corruptions
    if corruption_rows:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r.corruption} {r.severity}" for r in corruption_rows]
        positions = range(len(labels))
        ax.bar([p - 0.2 for p in positions], [100 * r.fp32_accuracy for r in corruption_rows], 0.4, label="fp32")
        ax.bar([p + 0.2 for p in positions], [100 * r.worst_accuracy for r in corruption_rows], 0.4, label="worst case")
        ax.set_xticks(list(positions), labels, rotation=60, fontsize=7)
        ax.set_ylabel("ORT accuracy (%)")
        set_title(ax, f"Common corruptions: full precision versus the worst policy ({images})")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))  # beside the bars, not over them
        save("corruptions", fig)
    return figures


TITLE_PT = 11
CHARACTER_EM = 0.65  # a generous average width of a title character, in em (DejaVu Sans is about 0.55)


def set_title(ax, text: str) -> None:
    """The axes' title, wrapped to the figure's width so that no title is cut off."""
    ax.set_title(textwrap.fill(text, int(ax.figure.get_figwidth() * 72 / (CHARACTER_EM * TITLE_PT))), fontsize=TITLE_PT)


def _short(name: str) -> str:
    return name if len(name) <= 28 else "…" + name[-27:]


# --- tables shared by Markdown and HTML -------------------------------------------------------------

def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def _pts(value) -> str:
    return "" if value is None else f"{value:+.2f}"


Section = tuple[str, str, list[str], list[list[str]], str | None]  # anchor, title, headers, rows, plot name


def tables(report: Report) -> list[Section]:
    """Every section of the report, in order."""
    h = report.headline
    verdict = {"pass": "PASS", "fail": "FAIL", "not gated": "not gated (no --max-drop / --min-accuracy)"}[h.gate.verdict]
    a = report.analysis
    sections = _ship_sections(a.ship_policy, a, h) if a and a.ship_policy else []
    fleet = " (the fleet's lowest)" if h.shows_kernels else ""
    per_family = [[f"{case} case, {family} ({h.kernels[family]})", _pct(accuracy)]
                  for case, measured in (("worst", h.worst_by_kernels), ("best", h.best_by_kernels))
                  for family, accuracy in measured.items()] if h.shows_kernels else []
    title = "Budget search (whole evaluation data; " + ("per kernel family: ORT for this machine's, emulated for others)"
                                                        if h.shows_kernels else "ONNX Runtime)")
    sections.append(("headline", title, ["figure", "value"], [
        ["model", h.model], ["data", f"{h.dataset}, {h.images} {h.unit}"], ["batch size", str(h.batch_size)],
    ] + [["padding", h.scenario]] * bool(h.scenario) + [
        ["integer kernels", ", ".join(f"{family} ({source})" for family, source in h.kernels.items())],
        ["budget", f"{h.budget_effective_bits:.2f} effective bits (bits {','.join(map(str, h.bits))})"],
        ["fp32 accuracy", _pct(h.fp32_accuracy)],
        [f"best case{fleet}", _pct(h.best_accuracy) or "not searched (--objective worst)"],
        [f"worst case{fleet}", _pct(h.worst_accuracy)], ["worst-case drop (points)", f"{h.worst_drop_points:.2f}"],
    ] + per_family + [
        [f"{case} uniform policy inside the budget ({uniform.label})", _pct(uniform.accuracy)]
        for case, uniform in (("best", h.best_uniform), ("worst", h.worst_uniform)) if uniform is not None
    ] + [
        ["engine agreement (simulator = ORT, top-1)", _pct(h.engine_agreement)],
        ["verdict", verdict],
    ] + [[c.name, ("pass" if c.passed else "FAIL") + f" ({c.value:.2f})"] for c in h.gate.checks], None))
    if report.distill is not None:
        sections.append(_distill_section(report.distill))
    sections.append(("worst-policy", "Worst policy found", ["layer", "setting"],
                     [[name, label] for name, label in h.worst_policy.items()], None))
    a = report.analysis
    if a:
        sections += _analysis_sections(a, h)
    return sections


def _distill_section(d: DistillSummary) -> Section:
    """Teacher and student side by side on ORT: fp32, the student's policy, w8a8 (student), and the worst case
    the same fresh search found on each (a robust run audits both), with drops from each one's fp32."""

    def cell(accuracy: float | None, fp32: float) -> str:
        return "" if accuracy is None else f"{_pct(accuracy)} ({drop_points(fp32, accuracy):+.2f})"

    teacher, student = d.teacher_fp32_accuracy, d.student_fp32_accuracy
    hardened = f", {d.hardening} hardening" if d.hardening else ""
    return ("distill", f"Distilled {d.mode} student{hardened} against its teacher (ORT accuracy, drop in points from each "
                       "one's fp32)", ["", "teacher", "student"], [
        ["fp32", _pct(teacher), _pct(student)],
        [f"under the student's policy ({d.policy_effective_bits:.2f} effective bits)",
         cell(d.teacher_policy_accuracy, teacher), cell(d.student_policy_accuracy, student)],
        ["w8a8", "", cell(d.student_w8a8_accuracy, student)],
        ["worst case a fresh search found (not told the policy)",
         cell(d.teacher_audit and d.teacher_audit.worst_accuracy, teacher) or "not searched (detrimental run)",
         cell(d.audit.worst_accuracy, student)]], None)


def _ship_sections(ship: ShipPolicy, a: Analysis, h: Headline) -> list[Section]:
    """The policy a team ships, first: its accuracy per kernel family, then per batch size and corruption."""
    families = [f"{k.kernel_family} ({k.source})" for k in ship.kernels]
    lowest = [["lowest", "drop (pts)"]] if len(families) > 1 else [["drop (pts)"]]

    def row(name: str, accuracies: list[float]) -> list[str]:
        low = min(accuracies)
        return ([name] + [_pct(a) for a in accuracies] + [_pct(low)] * (len(accuracies) > 1)
                + [_pts(drop_points(ship.fp32_accuracy, low))])

    sections = [("ship-policy", f"Shipping {ship.policy}: {ship.description} (whole evaluation data, {ship.images:,} "
                 f"{a.unit}, batch size {h.batch_size}; fp32 {_pct(ship.fp32_accuracy)}; {ship.effective_bits:.2f} "
                 "effective bits), then with each mitigation of the avx2-u8s8 saturation",
                 ["policy"] + families + lowest[0],
                 [row(ship.policy, [k.accuracy for k in ship.kernels])]
                 + [row(f"+ {m.change}", [m.kernels[k.kernel_family] for k in ship.kernels]) for m in ship.mitigations],
                 None),
                ("recommendation", "Recommendation", ["for the fleet"], [[ship.recommendation]], None)]
    subset = ship.kernels[0].batch_sizes
    if subset:
        sections.append(("ship-batch-size", f"Shipping {ship.policy}: accuracy versus batch size ({_images(a, h)})",
                         ["batch size"] + families,
                         [[str(row.batch_size)] + [_pct(k.batch_sizes[i].worst_accuracy) for k in ship.kernels]
                          for i, row in enumerate(subset)], None))
    if ship.kernels[0].corruptions:
        sections.append(("ship-corruptions", f"Shipping {ship.policy}: {_corruptions_title(a).lower()} ({_images(a, h)})",
                         ["corruption", "severity", "fp32"] + families,
                         [[row.corruption, str(row.severity), _pct(row.fp32_accuracy)]
                          + [_pct(k.corruptions[i].worst_accuracy) for k in ship.kernels]
                          for i, row in enumerate(ship.kernels[0].corruptions)], None))
    return sections


def _analysis_sections(a: Analysis, h: Headline) -> list[Section]:
    engine = f"ORT's {a.kernel_family} kernels" if a.kernel_family else "ORT"
    on_images = f"{engine} on {_images(a, h)}"
    note = f"{on_images}, batch size {a.batch_size}"
    by_layer: dict[str, dict] = {}
    for r in a.layer_sensitivity:
        by_layer.setdefault(r.layer, {})[r.bits] = r.drop_points
    widths = sorted({r.bits for r in a.layer_sensitivity})
    frequency = a.low_bit_frequency.layers
    ranked = sorted(by_layer, key=lambda layer: -max(by_layer[layer].values()))
    teacher: dict[str, dict] = {}
    for r in a.teacher_layer_sensitivity:  # a robust distill run: the teacher beside the student
        teacher.setdefault(r.layer, {})[r.bits] = r.drop_points
    sections = [("sensitivity", f"Per-layer sensitivity: drop in points with one layer at WbAb ({note})"
                 + ("; the student's, then its teacher's" if teacher else ""),
                 ["layer"] + [f"W{b}A{b}" for b in widths] + [f"teacher W{b}A{b}" for b in widths if teacher]
                 + ["low bits in worst policies"],
                 [[layer] + [f"{by_layer[layer][b]:+.2f}" for b in widths]
                  + [f"{teacher[layer][b]:+.2f}" if b in teacher.get(layer, {}) else "" for b in widths if teacher]
                  + [f"{100 * frequency.get(layer, 0):.0f}%"] for layer in ranked], "sensitivity")]
    if any(a.budget_curves.values()):
        differs = "" if a.images == h.images else f"; the headline's figures come from all {h.images:,}"
        sections.append(("budget", f"Accuracy versus budget: policies the search scored, re-measured ({note}{differs})",
                         ["case", "budget (eff. bits)", "policy (eff. bits)", "accuracy"], _budget_rows(a.budget_curves),
                         "budget"))
    pi = a.per_input
    sections.append(("per-class", f"Per class under the worst policy ({note}; {pi.flipped} inputs flipped, "
                     f"{100 * pi.flipped_fraction:.1f}%)", ["class", "images", "fp32", "worst case", "drop (pts)"],
                     [[c.class_name, str(c.images), _pct(c.fp32_accuracy), _pct(c.worst_accuracy), _pts(c.drop_points)]
                      for c in pi.per_class], "per_class"))
    if pi.flipped_inputs:
        ratio = (f"; mean range score {pi.mean_range_score_flipped:.2f} for flipped inputs against "
                 f"{pi.mean_range_score_kept:.2f} for the others" if pi.mean_range_score_kept is not None else "")
        texts = any(f.text is not None for f in pi.flipped_inputs)
        sections.append(("flipped", f"Inputs the worst policy flips, highest range score first ({note}{ratio})",
                         ["index", "class", "fp32 says", "worst case says", "range score"] + ["sentence"] * texts,
                         [[str(f.index), f.class_name, f.fp32_label, f.worst_label, f"{f.range_score:.2f}"]
                          + [f.text or ""] * texts for f in pi.flipped_inputs[:20]], None))
    if a.by_length:
        sections.append(("length", f"Accuracy by sentence length under the worst policy ({note})",
                         ["tokens", "sentences", "fp32", "worst case", "drop (pts)"],
                         [[r.tokens, str(r.sentences), _pct(r.fp32_accuracy), _pct(r.worst_accuracy), _pts(r.drop_points)]
                          for r in a.by_length], None))
    if a.padding:
        sections.append(("padding", f"Padding: the same sentences, padded per batch or to a fixed length ({note})",
                         ["padding", "fp32", "worst case", "drop (pts)"],
                         [[r.scenario, _pct(r.fp32_accuracy), _pct(r.worst_accuracy), _pts(r.drop_points)]
                          for r in a.padding], None))
    sections.append(("batch-size", f"Worst-case accuracy versus batch size ({on_images})", ["batch size", "accuracy"],
                     [[str(s.batch_size), _pct(s.worst_accuracy)] for s in a.batch_sizes], "batch_size"))
    c = a.batch_composition
    sections.append(("composition", f"Batch composition: the highest-range input (#{c.outlier_index}, "
                     f"{c.outlier_class}, range score {c.outlier_range_score:.2f}) in every batch of "
                     f"{c.batch_size} ({on_images})", ["the other inputs", "worst-case accuracy"],
                     [["each alone (batch size 1)", _pct(c.alone_accuracy)],
                      ["in ordinary batches", _pct(c.ordinary_batches_accuracy)],
                      ["beside the high-range input", _pct(c.with_outlier_accuracy)]], None))
    if a.corruptions:
        sections.append(("corruptions", f"{_corruptions_title(a)} ({note})",
                         ["corruption", "severity", "fp32", "worst case", "drop (pts)"],
                         [[r.corruption, str(r.severity), _pct(r.fp32_accuracy), _pct(r.worst_accuracy),
                           _pts(r.drop_points)] for r in a.corruptions], "corruptions"))
    return sections


def _corruptions_title(a: Analysis) -> str:
    return "Common corruptions" if a.unit == "images" else "Text perturbations (typos, dropped words, casing)"


def _images(a: Analysis, h: Headline) -> str:
    """The examples an analysis figure comes from, said against the headline's (the whole evaluation data)."""
    count, everything, unit = a.images, h.images, a.unit
    if count == everything:
        return f"all {everything:,} evaluation {unit}"
    if count < everything:
        return f"{count:,} of the {everything:,} evaluation {unit}"
    return f"{count:,} {unit} of {a.dataset}, not the headline's {everything:,}"


def _budget_rows(curves: dict[str, list[BudgetPoint]]) -> list[list[str]]:
    """One row per policy picked. Budget levels that pick the same policy share its row: they form a run
    of consecutive levels (a policy lowest among those costing at least a level stays lowest at every
    level up to its own cost), so the row gives the first and last."""
    rows = []
    for objective in ("worst", "best"):
        picks: dict[str, list[BudgetPoint]] = {}
        for point in curves.get(objective, []):
            picks.setdefault(point.digest, []).append(point)
        for points in picks.values():
            levels = sorted(p.budget_effective_bits for p in points)
            budget = f"{levels[0]:.2f}" if len(levels) == 1 else f"{levels[0]:.2f} to {levels[-1]:.2f}"
            rows.append([objective, budget, f"{points[0].policy_effective_bits:.2f}", _pct(points[0].ort_accuracy)])
    return rows


GLOSSARY = [
    ("WbAb", "a layer's weights quantized to b bits (symmetric integer codes, per tensor or per output channel) "
             "and its input activations to b bits (asymmetric, the range measured on every inference call over "
             "the whole batch); W4A8 means 4-bit weights and 8-bit activations, fp32 a layer left unquantized."),
    ("effective bits", "a policy's cost, sqrt(BitOPs / MACs), where BitOPs sums MACs x weight bits x activation "
                       "bits over the layers (an fp32 layer counts 32 x 32): a uniform WbAb policy has b, W4A8 "
                       "has 5.66."),
    ("budget floor and ceiling", "the budget is a cost in effective bits. The worst case is searched among "
                                 "policies costing at least it (a floor: without one, 2 bits everywhere would be a "
                                 "trivial worst case), the best case among policies costing at most it (a ceiling: "
                                 "without one, 8 bits everywhere would be a trivial best case)."),
    ("uniform policy inside the budget", "every searched layer at one weight and one activation width (W6A6, "
                                         "W8A4, ...). The search scores those on the budget's edge first and measures "
                                         "the most extreme on ORT beside its candidates, so a reported case is never "
                                         "less extreme than it."),
    ("drop (points)", "FP32 accuracy minus the quantized accuracy, in percentage points."),
    ("integer kernels (kernel family)", "the integer arithmetic of ONNX Runtime's CPU kernels, which differs between "
                                        "CPUs: exact (int32 sums: VNNI, AMX, ARM dot product) or avx2-u8s8 (x86-64 "
                                        "AVX2 without VNNI: uint8 x int8 products summed in pairs that saturate at "
                                        "int16). A fleet is the families of the CPUs a model will run on."),
    ("ORT / emulated", "a family's numbers come from ONNX Runtime's own kernels when it is the family of the machine "
                       "that measured them (ORT), else from the simulator's exact emulation of that family's "
                       "arithmetic (emulated), which is tested against an independent NumPy model of it."),
    ("ship policy", "the one policy the team deploys (quantize_dynamic's default W8A8 unless --ship-policy says "
                    "otherwise), reported first, before the budget search's worst and best cases."),
    ("engine agreement", "the share of inputs on which the simulator, which ranks candidates during the search, "
                         "predicts the same class as ONNX Runtime, lowest over the verified candidates. Every "
                         "accuracy in this report is ONNX Runtime's."),
    ("flips (flipped inputs)", "inputs that FP32 classifies correctly and the worst policy misclassifies."),
    ("range score", "for one input, the largest ratio over the quantized layers of its activation range at the "
                    "layer's input (max - min, in FP32) to that layer's median range over the analysed images. "
                    "A score of 5 means some layer sees five times its usual range: in a batch, that input widens "
                    "the shared quantization range and coarsens every other input's steps."),
    ("padding (text)", "how sentences of different lengths are made one batch: padded to the batch's longest "
                       "sentence (as Hugging Face pipelines do) or to a fixed length. Padded positions are computed "
                       "like real ones and enter the activation ranges dynamic quantization measures, so padding can "
                       "change the quantized result; the analysis measures both."),
    ("text perturbations", "the text counterpart of image corruptions, each at severities 1-5 touching 5-30% of a "
                           "sentence's words: typos (one letter swapped, dropped, repeated or replaced), dropped "
                           "words, and casing (words upper-cased; an uncased tokenizer undoes it)."),
    ("low bits in worst policies", "the share of the worst policies the search found (its verified candidates "
                                   "and its lowest-scoring worst-case policies) that give the layer a weight or "
                                   "activation width below the largest of --bits."),
]

NUMBERS = ("Every accuracy comes from ONNX Runtime's kernels, except those labelled emulated (another kernel family's "
           "arithmetic, by the simulator); otherwise the simulator only ranks candidates.")
GLOSSARY_POINTER = "Terms (WbAb, effective bits, budget floor and ceiling, range score, flips) are explained in the {link} at the end."


# --- renderers --------------------------------------------------------------------------------------

def render_markdown(report: Report, plot_links: dict[str, str]) -> str:
    lines = ["# ptqaudit report", "", GLOSSARY_POINTER.format(link="[glossary](#glossary)"), ""]
    for _, title, headers, rows, plot in tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        if plot and plot in plot_links:
            lines += ["", f"![{title}]({plot_links[plot]})"]
        lines.append("")
    lines += ["## Glossary", ""] + [f"- **{term}**: {text}" for term, text in GLOSSARY] + [""]
    lines.append(NUMBERS)
    return "\n".join(lines) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;display:block;margin:0.5em 0 2em}.fail{color:#b00;font-weight:bold}
.pass{color:#070;font-weight:bold}dt{font-weight:bold}dd{margin:0 0 0.6em 1.5em}"""


def render_html(report: Report, figures: dict[str, bytes]) -> str:
    verdict = report.headline.gate.verdict
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>ptqaudit report</title>',
             f"<style>{STYLE}</style></head><body>", "<h1>ptqaudit report</h1>",
             f'<p>Verdict: <span class="{ {"pass": "pass", "fail": "fail"}.get(verdict, "")}">'
             f"{html.escape(verdict)}</span></p>",
             "<p>" + GLOSSARY_POINTER.format(link='<a href="#glossary">glossary</a>') + "</p>"]
    for anchor, title, headers, rows, plot in tables(report):
        parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')
        parts.append(f'<table id="table-{anchor}"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                     + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]
        parts.append("</tbody></table>")
        if plot and plot in figures:
            data = base64.b64encode(figures[plot]).decode("ascii")
            parts.append(f'<img id="plot-{plot}" alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    parts.append('<h2 id="glossary">Glossary</h2>')
    parts.append("<dl>" + "".join(f"<dt>{html.escape(term)}</dt><dd>{html.escape(text)}</dd>" for term, text in GLOSSARY)
                 + "</dl>")
    parts.append(f"<p>{html.escape(NUMBERS)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def render_junit(report: Report) -> str:
    """The gate as JUnit XML: one test case per threshold (one passing case when none is set)."""
    h = report.headline
    checks = h.gate.checks
    suite = ET.Element("testsuite", name="ptqaudit", tests=str(max(len(checks), 1)),
                       failures=str(sum(not c.passed for c in checks)), errors="0", skipped="0")
    properties = ET.SubElement(suite, "properties")
    for key in ("model", "dataset", "batch_size", "budget_effective_bits", "fp32_accuracy", "worst_accuracy",
                "worst_drop_points", "best_accuracy", "engine_agreement"):
        ET.SubElement(properties, "property", name=key, value=str(getattr(h, key)))
    summary = (f"fp32 {100 * h.fp32_accuracy:.2f}%, worst case {100 * h.worst_accuracy:.2f}% "
               f"(drop {h.worst_drop_points:.2f} points) within {h.budget_effective_bits:.2f} effective bits, "
               f"batch size {h.batch_size}")
    for check in checks or [Check("worst-case audit (no thresholds set)", "", 0.0, 0.0, True, "")]:
        case = ET.SubElement(suite, "testcase", classname=f"ptqaudit.gate.{Path(h.model).stem}", name=check.name)
        if not check.passed:
            failure = ET.SubElement(case, "failure", message=check.message, type="GateFailed")
            failure.text = summary
        ET.SubElement(case, "system-out").text = summary
    suites = ET.Element("testsuites", name="ptqaudit", tests=suite.get("tests"), failures=suite.get("failures"))
    suites.append(suite)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def render(report: Report, fmt: str, figures: dict[str, bytes], plot_dir: Path, output: Path | None) -> str:
    """The report in `fmt`. Markdown links the PNGs in plot_dir relative to the folder it is written to, or,
    when it goes to standard output, to the current folder (where `> report.md` saves it)."""
    if fmt == "md":
        base = output.parent if output is not None else Path.cwd()
        links = {name: os.path.relpath(plot_dir / f"{name}.png", base) for name in figures}
        return render_markdown(report, links)
    if fmt == "html":
        return render_html(report, figures)
    if fmt == "json":
        return render_json(report)
    if fmt == "junit":
        return render_junit(report)
    raise PtqauditError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
