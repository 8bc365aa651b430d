"""`ptqaudit report` and the release gate: the analysis against direct ORT runs, every format, exit codes,
and the HTML report rendered in a real headless browser."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from reference_cases import ort_labels

from ptqaudit.analysis import ANALYSIS_FILE, Analysis, AnalysisSettings, BudgetPoint, analyse, cached_analysis, corrupt, load_run
from ptqaudit.cli import main
from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.errors import PtqauditError
from ptqaudit.onnx_graph import load_model
from ptqaudit.policy import LayerQuant, ResolvedPolicy, load_policy
from ptqaudit.quantize import quantize
from ptqaudit.gate import Gate
from ptqaudit.report import build, render_markdown, set_title

REPO = Path(__file__).resolve().parent.parent
DIGITS_MODEL = str(REPO / "sample_models" / "digits_cnn.onnx")
LIMIT = 200
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def search_run(tmp_path_factory) -> Path:
    """A small worst-and-best search of the digits model, shared by this module's tests."""
    out = tmp_path_factory.mktemp("report") / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["search", DIGITS_MODEL, "--max-evaluations", "60", "--no-progress", "-o", str(out)])
    assert exit_info.value.code == 0
    return out


@pytest.fixture(scope="module")
def analysis(search_run) -> Analysis:
    run = load_run(search_run)
    return analyse(run, AnalysisSettings(limit=LIMIT, batch_sizes=(1, 4, 16)), progress=False, echo=lambda m: None)


def _worst_proto(search_run: Path):
    model = load_model(DIGITS_MODEL)
    return quantize(model, load_policy(str(search_run / "worst.yaml")).resolve(model.layers)).proto


def test_analysis_accuracies_match_direct_ort_runs(search_run, analysis):
    data = load_dataset(DataConfig("digits", limit=LIMIT))
    model = load_model(DIGITS_MODEL)
    fp32 = ort_labels(model.proto, data.x, 1)
    worst = ort_labels(_worst_proto(search_run), data.x, 1)
    assert analysis.fp32_accuracy == pytest.approx(np.mean(fp32 == data.y))
    assert analysis.worst_accuracy == pytest.approx(np.mean(worst == data.y))
    flipped = (fp32 == data.y) & (worst != data.y)
    assert analysis.per_input.flipped == int(flipped.sum())
    assert {f.index for f in analysis.per_input.flipped_inputs} <= set(np.flatnonzero(flipped).tolist())
    for row in analysis.per_input.per_class:
        members = data.y == data.classes.index(row.class_name)
        assert row.worst_accuracy == pytest.approx(np.mean(worst[members] == data.y[members]))
    at_16 = next(r for r in analysis.batch_sizes if r.batch_size == 16)
    assert at_16.worst_accuracy == pytest.approx(np.mean(ort_labels(_worst_proto(search_run), data.x, 16) == data.y))


def test_layer_sensitivity_matches_a_policy_file_run_on_ort(analysis):
    row = max(analysis.layer_sensitivity, key=lambda r: r.drop_points)
    model = load_model(DIGITS_MODEL)
    policy = load_policy("w8a8").resolve(model.layers)
    policy.mapping[row.layer] = type(policy.mapping[row.layer])(row.bits, row.bits, False)
    data = load_dataset(DataConfig("digits", limit=LIMIT))
    labels = ort_labels(quantize(model, policy).proto, data.x, 1)
    assert row.accuracy == pytest.approx(np.mean(labels == data.y))
    layers = {r.layer for r in analysis.layer_sensitivity}
    assert layers == {layer.name for layer in model.layers}


def test_batch_composition_matches_batches_built_here(search_run, analysis):
    c = analysis.batch_composition
    data = load_dataset(DataConfig("digits", limit=LIMIT))
    others = np.array([i for i in range(len(data)) if i != c.outlier_index])
    proto = _worst_proto(search_run)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    labels = []
    for start in range(0, len(others), c.batch_size - 1):
        chunk = others[start:start + c.batch_size - 1]
        batch = np.concatenate([data.x[chunk], data.x[c.outlier_index:c.outlier_index + 1]])
        labels.append(session.run(None, {name: batch})[0][:-1].argmax(axis=1))
    assert c.with_outlier_accuracy == pytest.approx(np.mean(np.concatenate(labels) == data.y[others]))
    # the outlier is the input with the widest first-layer input range (the image itself, relative to the median)
    spans = np.ptp(data.x.reshape(len(data), -1), axis=1)
    assert spans[c.outlier_index] / np.median(spans) <= c.outlier_range_score + 1e-6


def test_corruptions_follow_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(corrupt(x, "brightness", 2), np.clip(x + 0.2, 0, 1), atol=1e-7)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(corrupt(x, "contrast", 5), np.clip((x - mean) * 0.15 + mean, 0, 1), atol=1e-6)
    noisy = corrupt(x, "gaussian_noise", 5) - x
    assert 0.05 < noisy.std() < 0.12 and np.all(corrupt(x, "gaussian_noise", 5) <= 1)
    image = Image.fromarray(np.round(x[0] * 255).astype(np.uint8).transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=40)
    expected = np.asarray(Image.open(buffer), dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(corrupt(x, "jpeg", 5)[0], expected, atol=1e-6)


def test_corruption_rows_match_direct_ort_runs(search_run, analysis):
    row = next(r for r in analysis.corruptions if r.corruption == "gaussian_noise" and r.severity == 3)
    data = load_dataset(DataConfig("digits", limit=LIMIT))
    x = corrupt(data.x, "gaussian_noise", 3)
    assert row.fp32_accuracy == pytest.approx(np.mean(ort_labels(load_model(DIGITS_MODEL).proto, x, 1) == data.y))
    assert row.worst_accuracy == pytest.approx(np.mean(ort_labels(_worst_proto(search_run), x, 1) == data.y))


def test_gate_checks_each_threshold():
    assert Gate().failure(0.9, 0.1) is None
    assert Gate(max_drop=2.0).failure(0.90, 0.885) is None
    message = Gate(max_drop=2.0).failure(0.90, 0.85)
    assert "worst-case drop 5.00 points exceeds --max-drop 2" in message
    assert "below --min-accuracy 80" in Gate(min_accuracy=80).failure(0.9, 0.79)
    both = Gate(max_drop=1, min_accuracy=95).failure(0.9, 0.5)
    assert "--max-drop" in both and "--min-accuracy" in both


def test_gate_passes_a_figure_exactly_at_its_threshold():
    """Against integer arithmetic on example counts out of 10,000 (a drop of d examples is d hundredths of a point):
    every count pair and threshold in hundredths on a grid, where floating point puts some exact ties a few ulps past
    the line (100 * (0.8124 - 0.8074) = 0.5000000000000004)."""
    examples = 10_000
    for fp32_count in range(7000, 7300, 7):
        for worst_count in range(6900, 7300, 3):
            for hundredths in range(0, 400, 13):
                passed = Gate(max_drop=hundredths / 100).failure(fp32_count / examples, worst_count / examples) is None
                assert passed == (fp32_count - worst_count <= hundredths), (fp32_count, worst_count, hundredths)
    for worst_count in range(2800, 3000, 3):
        for hundredths in range(2800, 3000, 7):
            passed = Gate(min_accuracy=hundredths / 100).failure(0.9, worst_count / examples) is None
            assert passed == (worst_count >= hundredths), (worst_count, hundredths)


def _figures(search_run: Path) -> tuple[float, float]:
    summary = json.loads((search_run / "summary.json").read_text())
    return summary["fp32_accuracy"], summary["worst"]["ort_accuracy"]


def test_report_gate_exit_codes(search_run, analysis, capsys):
    fp32, worst = _figures(search_run)
    drop = 100 * (fp32 - worst)
    code, out, err = _run_cli(["report", str(search_run), "--format", "json", "--no-progress",
                               "--analysis-limit", str(LIMIT), "--max-drop", f"{drop / 2:.3f}"], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("ptqaudit: gate failed: worst-case drop")
    assert json.loads(out)["headline"]["gate"]["verdict"] == "fail"  # the report is written all the same
    code, out, err = _run_cli(["report", str(search_run), "--format", "json", "--no-analysis",
                               "--max-drop", f"{drop + 1:.3f}", "--min-accuracy", f"{100 * worst - 1:.3f}"], capsys)
    assert code == 0 and json.loads(out)["headline"]["gate"]["verdict"] == "pass"
    code, _, err = _run_cli(["report", str(search_run), "--no-analysis", "--min-accuracy", f"{100 * worst + 1:.3f}"],
                            capsys)
    assert code == 1 and "worst-case accuracy" in err and "--min-accuracy" in err


def test_search_accepts_the_gate(tmp_path, capsys):
    args = ["search", DIGITS_MODEL, "--objective", "worst", "--max-evaluations", "45", "--no-progress"]
    code, out, err = _run_cli(args + ["-o", str(tmp_path / "a"), "--max-drop", "0"], capsys)
    fp32, worst = _figures(tmp_path / "a")
    assert (code == 1) == (fp32 > worst)
    assert code == 1 and "gate failed" in err and len(err.strip().splitlines()) == 1
    code, out, err = _run_cli(args + ["-o", str(tmp_path / "b"), "--max-drop", "100"], capsys)
    assert code == 0 and "gate passed" in out
    code, _, err = _run_cli(["search", DIGITS_MODEL, "--objective", "best", "--max-drop", "1"], capsys)
    assert code == 2 and "--objective worst or both" in err


def test_json_and_junit_carry_the_run_figures(search_run, analysis, capsys):
    fp32, worst = _figures(search_run)
    code, out, _ = _run_cli(["report", str(search_run), "--format", "json", "--analysis-limit", str(LIMIT),
                             "--no-progress"], capsys)
    document = json.loads(out)
    assert code == 0
    assert document["headline"]["fp32_accuracy"] == fp32 and document["headline"]["worst_accuracy"] == worst
    assert document["analysis"]["layer_sensitivity"] == analysis.to_dict()["layer_sensitivity"]  # the cached analysis
    code, out, _ = _run_cli(["report", str(search_run), "--format", "junit", "--no-analysis", "--max-drop", "0",
                             "--min-accuracy", "0"], capsys)
    root = ET.fromstring(out)
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 2 and suite.get("failures") == str(int(fp32 > worst))
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == (["worst-case drop <= 0 points"] if fp32 > worst else [])
    assert code == (1 if fp32 > worst else 0)


def test_markdown_links_plots_that_exist(search_run, analysis, tmp_path, capsys):
    target = tmp_path / "out" / "report.md"
    code, _, _ = _run_cli(["report", str(search_run), "-o", str(target), "--analysis-limit", str(LIMIT),
                           "--no-progress"], capsys)
    assert code == 0
    text = target.read_text()
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert len(links) == 5
    for link in links:
        png = (target.parent / link).resolve()
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fp32 accuracy |" in text


def test_report_of_a_distill_run_includes_the_student_table(tmp_path, capsys):
    out = tmp_path / "distilled"
    code, _, _ = _run_cli(["distill", DIGITS_MODEL, "--mode", "detrimental", "--epochs", "1", "--min-epoch-batches", "1",
                           "--policy-steps", "1", "--audit-evaluations", "45", "--no-progress", "-o", str(out)], capsys)
    assert code == 0
    code, text, _ = _run_cli(["report", str(out), "--no-analysis"], capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "Distilled detrimental student" in text
    assert f"{100 * summary['student_policy_accuracy']:.2f}% (" in text
    assert "not searched (detrimental run)" in text and "teacher_audit" not in summary
    assert str(out / "student.onnx") in text


def test_report_of_a_robust_run_sets_teacher_and_student_side_by_side(tmp_path, capsys):
    """A robust run also searches its teacher the same way (teacher-audit/); the report shows both worst cases
    and both per-layer sensitivities. The teacher's numbers are measured again here on ORT from the files."""
    out = tmp_path / "robust"
    code, _, err = _run_cli(["distill", DIGITS_MODEL, "--mode", "robust", "--epochs", "1", "--min-epoch-batches", "1",
                             "--policy-steps", "1", "--train-limit", "300", "--policy-limit", "100", "--audit-evaluations", "30",
                             "--no-progress", "-o", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    teacher_audit = summary["teacher_audit"]
    teacher = load_model(DIGITS_MODEL)
    test = load_dataset(DataConfig("digits"))
    worst = load_policy(str(out / teacher_audit["policy_file"])).resolve(teacher.layers)
    measured = float(np.mean(ort_labels(quantize(teacher, worst).proto, test.x, 1) == test.y))
    assert teacher_audit["worst_accuracy"] == pytest.approx(measured)
    assert teacher_audit["drop_points"] == pytest.approx(100 * (summary["teacher_fp32_accuracy"] - measured))

    code, text, err = _run_cli(["report", str(out), "--analysis-limit", str(LIMIT), "--no-progress"], capsys)
    assert code == 0, err
    assert f"{100 * measured:.2f}% ({teacher_audit['drop_points']:+.2f})" in text
    assert f"{100 * summary['audit']['worst_accuracy']:.2f}% ({summary['audit']['drop_points']:+.2f})" in text
    assert "teacher W4A4" in text and f"Distilled robust student, {summary['hardening']} hardening" in text
    analysis = json.loads((out / "audit" / ANALYSIS_FILE).read_text())
    rows = analysis["teacher_layer_sensitivity"]
    assert {r["layer"] for r in rows} == {layer.name for layer in teacher.layers}
    subset = load_dataset(DataConfig("digits", limit=LIMIT))
    base = load_policy("w8a8").resolve(teacher.layers)
    fp32 = float(np.mean(ort_labels(teacher.proto, subset.x, 1) == subset.y))
    row = rows[0]  # one row against a policy built here: that layer alone at W4A4, the rest at w8a8
    mapping = dict(base.mapping)
    mapping[row["layer"]] = LayerQuant(row["bits"], row["bits"], base.mapping[row["layer"]].per_channel)
    probe = ResolvedPolicy("probe", mapping, base.options)
    accuracy = float(np.mean(ort_labels(quantize(teacher, probe).proto, subset.x, 1) == subset.y))
    assert row["accuracy"] == pytest.approx(accuracy)
    assert row["drop_points"] == pytest.approx(100 * (fp32 - accuracy))


def test_report_bad_input_is_exit_2(tmp_path, capsys):
    code, _, err = _run_cli(["report", str(tmp_path)], capsys)
    assert code == 2 and "no finished run" in err


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium; .ci/run installs it)")
def test_html_report_renders_its_tables_and_images_in_headless_chromium(search_run, analysis, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    target = tmp_path / "report.html"
    code, _, _ = _run_cli(["report", str(search_run), "--format", "html", "-o", str(target),
                           "--analysis-limit", str(LIMIT), "--no-progress"], capsys)
    assert code == 0
    text = target.read_text()
    assert "src=\"http" not in text and "<link" not in text  # self-contained
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        page.goto(target.as_uri())
        images = page.evaluate("""[...document.images].map(i => ({id: i.id, complete: i.complete,
                                  w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().height}))""")
        headline = page.evaluate("""[...document.querySelectorAll('#table-headline tr')].map(
                                    r => [...r.cells].map(c => c.innerText))""")
        tables = page.evaluate("[...document.querySelectorAll('table')].map(t => t.rows.length)")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert len(images) == 5
    assert all(i["complete"] and i["w"] > 100 and i["h"] > 100 and i["shown"] > 50 for i in images), images
    fp32, worst = _figures(search_run)
    assert ["fp32 accuracy", f"{100 * fp32:.2f}%"] in headline and ["worst case", f"{100 * worst:.2f}%"] in headline
    assert len(tables) >= 8 and all(rows >= 2 for rows in tables)
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_html_default_location_is_the_run_folder(search_run, analysis, capsys):
    code, _, err = _run_cli(["report", str(search_run), "--format", "html", "--analysis-limit", str(LIMIT),
                             "--no-progress"], capsys)
    assert code == 0 and (search_run / "report.html").is_file() and "report.html" in err
    assert os.path.getsize(search_run / "report.html") > 20_000


# --- a report that explains itself, and writes nothing over its inputs ------------------------------------


def _headings(markdown: str) -> list[str]:
    return [line[3:] for line in markdown.splitlines() if line.startswith("## ")]


def test_glossary_defines_the_report_terms_in_markdown_and_html(search_run, analysis, tmp_path, capsys):
    terms = ["WbAb", "effective bits", "budget floor and ceiling", "range score", "flips"]
    code, markdown, _ = _run_cli(["report", str(search_run), "--analysis-limit", str(LIMIT), "--no-progress"], capsys)
    assert code == 0 and _headings(markdown)[-1] == "Glossary"
    glossary = markdown[markdown.index("## Glossary"):]
    defined = [line[4:line.index("**:")] for line in glossary.splitlines() if line.startswith("- **")]
    for term in terms:
        assert any(d.startswith(term) for d in defined), (term, defined)
    assert "sqrt(BitOPs / MACs)" in glossary and "median range" in glossary
    target = tmp_path / "report.html"
    code, _, _ = _run_cli(["report", str(search_run), "--format", "html", "-o", str(target), "--analysis-limit",
                           str(LIMIT), "--no-progress"], capsys)
    page = target.read_text()
    assert code == 0 and '<h2 id="glossary">Glossary</h2>' in page and 'href="#glossary"' in page
    for term in terms:
        assert re.search(rf"<dt>{re.escape(term)}[^<]*</dt><dd>", page), term


def test_every_analysis_figure_states_its_images(search_run, analysis, capsys):
    """The analysis measures LIMIT images, the headline all of the run's: every analysis section says so."""
    images = json.loads((search_run / "summary.json").read_text())["images"]
    assert images > LIMIT
    code, markdown, _ = _run_cli(["report", str(search_run), "--analysis-limit", str(LIMIT), "--no-progress"], capsys)
    assert code == 0
    sections = _headings(markdown)
    assert sections[0].startswith("Shipping w8a8: 8-bit weights") and f"whole evaluation data, {images} images" in sections[0]
    assert "Budget search (whole evaluation data; ONNX Runtime)" in sections
    analysed = [s for s in sections[1:] if s not in ("Budget search (whole evaluation data; ONNX Runtime)",
                                                      "Recommendation", "Worst policy found", "Glossary")]
    assert len(analysed) >= 6
    for title in analysed:
        assert f"{LIMIT} of the {images} evaluation images" in title, title
    budget = next(s for s in analysed if s.startswith("Accuracy versus budget"))
    assert f"the headline's figures come from all {images}" in budget


def _budget_table(markdown: str) -> list[list[str]]:
    start = markdown.index("## Accuracy versus budget")
    rows = [line for line in markdown[start:].split("\n\n")[1].splitlines()[2:]]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_budget_levels_picking_the_same_policy_share_one_row(search_run, analysis):
    report = build(load_run(search_run), Gate(), copy.deepcopy(analysis))

    def point(level, digest, cost, accuracy):
        return BudgetPoint(level, cost, accuracy, digest)

    report.analysis.budget_curves = {
        "worst": [point(3.0, "a", 6.1, 0.40), point(4.0, "a", 6.1, 0.40), point(5.0, "a", 6.1, 0.40),
                  point(6.0, "b", 6.5, 0.55), point(7.0, "c", 7.2, 0.80)],
        "best": [point(3.0, "d", 3.0, 0.70), point(4.0, "e", 3.9, 0.95), point(5.0, "e", 3.9, 0.95)],
    }
    assert _budget_table(render_markdown(report, {})) == [
        ["worst", "3.00 to 5.00", "6.10", "40.00%"], ["worst", "6.00", "6.50", "55.00%"],
        ["worst", "7.00", "7.20", "80.00%"], ["best", "3.00", "3.00", "70.00%"], ["best", "4.00 to 5.00", "3.90", "95.00%"]]


def test_analysis_round_trips_through_json(analysis):
    assert Analysis.from_dict(json.loads(json.dumps(analysis.to_dict())), "analysis.json") == analysis


def test_a_cached_analysis_of_another_layout_is_measured_again(search_run, analysis, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(search_run, run_dir)
    settings = AnalysisSettings(limit=LIMIT, batch_sizes=(1, 4, 16))
    stored = analysis.to_dict()
    (run_dir / ANALYSIS_FILE).write_text(json.dumps(stored))
    assert cached_analysis(load_run(run_dir), settings) == analysis
    stored["schema_version"] = 1  # what ptqaudit wrote before the typed analysis
    (run_dir / ANALYSIS_FILE).write_text(json.dumps(stored))
    assert cached_analysis(load_run(run_dir), settings) is None
    del stored["schema_version"]
    stored["per_input"]["flipped"] = "many"  # the current layout, changed by hand: named, not guessed at
    stored["schema_version"] = Analysis.schema_version
    (run_dir / ANALYSIS_FILE).write_text(json.dumps(stored))
    with pytest.raises(PtqauditError, match="per_input.flipped is a string, expected an integer"):
        cached_analysis(load_run(run_dir), settings)


def test_budget_table_of_a_real_run_has_one_row_per_distinct_policy(search_run, analysis):
    rows = _budget_table(render_markdown(build(load_run(search_run), Gate(), analysis), {}))
    curves = analysis.budget_curves
    for objective in ("worst", "best"):
        assert len([r for r in rows if r[0] == objective]) == len({p.digest for p in curves[objective]})


@pytest.mark.parametrize("width", [5, 6, 7])
def test_long_plot_titles_stay_inside_the_figure(width):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, 3.5))
    ax.set_ylabel("ORT accuracy (%)")
    set_title(ax, "Per-layer sensitivity: one layer at low bits, the rest at the base policy "
                  "(ORT, 1,000 of the 10,000 evaluation images)")
    fig.tight_layout()
    fig.canvas.draw()
    box = ax.title.get_window_extent(fig.canvas.get_renderer())
    plt.close(fig)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, (box, fig.bbox)


def test_markdown_on_stdout_links_plots_from_the_current_folder(search_run, analysis, tmp_path, monkeypatch, capsys):
    """`ptqaudit report RUN > report.md` saves the Markdown in the current folder: its links must work there."""
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    code, markdown, _ = _run_cli(["report", str(search_run), "--analysis-limit", str(LIMIT), "--no-progress"], capsys)
    assert code == 0
    (here / "report.md").write_text(markdown)
    links = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", markdown, re.MULTILINE)
    assert len(links) == 5
    for link in links:
        png = here / link
        assert png.is_file() and png.resolve().parent == (search_run / "plots").resolve()


def test_report_json_flag_prints_the_json_document(search_run, analysis, capsys):
    code, flag, _ = _run_cli(["report", str(search_run), "--json", "--no-analysis"], capsys)
    assert code == 0
    code, explicit, _ = _run_cli(["report", str(search_run), "--format", "json", "-o", "-", "--no-analysis"], capsys)
    assert code == 0 and json.loads(flag) == json.loads(explicit)
    code, out, err = _run_cli(["report", str(search_run), "--json", "--format", "md", "--no-analysis"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--json" in err


@pytest.fixture
def copied_run(search_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the shared run whose model is a copy too, so that --force may destroy them."""
    run = tmp_path / "run"
    shutil.copytree(search_run, run)
    model = tmp_path / "model.onnx"
    shutil.copy(DIGITS_MODEL, model)
    return run, model


@pytest.mark.parametrize("name", ["summary.json", "run.json", "trace.jsonl", "worst.yaml", "model"])
def test_report_refuses_to_overwrite_a_file_it_reads(copied_run, name, tmp_path, monkeypatch, capsys):
    run, model = copied_run
    victim = model if name == "model" else run / name
    before = victim.read_bytes()
    monkeypatch.chdir(tmp_path)
    spelled = f"./{victim.relative_to(tmp_path)}"  # another spelling of the same file
    args = ["report", str(run), "--model", str(model), "--format", "json", "--no-analysis", "-o"]
    code, out, err = _run_cli(args + [spelled], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ptqaudit: error:"), err
    assert spelled in lines[0] and str(victim.relative_to(tmp_path)) in lines[0] and "--force" in lines[0]
    assert victim.read_bytes() == before
    code, _, _ = _run_cli(args + [spelled, "--force"], capsys)
    assert code == 0 and json.loads(victim.read_text())["run"] == str(run)  # --force writes it


def test_report_rewrites_its_own_output(copied_run, capsys):
    run, model = copied_run
    args = ["report", str(run), "--model", str(model), "--no-analysis", "-o", str(run / "report.md")]
    assert _run_cli(args, capsys)[0] == 0
    assert _run_cli(args, capsys)[0] == 0  # a report is not an input: writing it again is fine
    assert (run / "report.md").read_text().startswith("# ptqaudit report")
