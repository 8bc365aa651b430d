"""Run folders that stay true after a crash or a slip: one writer at a time, --resume comparing the model's
and data's content rather than path strings, a trace cut mid-line repaired, and hand-edited or truncated
files refused with exit 2 naming the file and the field."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_tiny_digits_model

from ptqaudit.analysis import ANALYSIS_VERSION, AnalysisSettings, analyse, cached_analysis, load_run
from ptqaudit.cli import main
from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.distill import DistillConfig
from ptqaudit.errors import PtqauditError
from ptqaudit.runs import LOCK_FILE, RunFolder
from ptqaudit.search.run import SearchConfig

SEARCH = ["--limit", "100", "--search-limit", "60", "--max-evaluations", "10", "--method", "random",
          "--verify-top", "1", "--no-progress"]
ANALYSIS_LIMIT = 40


def _cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _save_model(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build_tiny_digits_model("gemm", seed), str(path))
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]


# --- one writer per run folder --------------------------------------------------------------------

def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path, capsys):
    """Another process holding RUN/.lock (as a running search does) makes --resume, and a fresh search into
    the folder, exit 2 without touching the trace; once that process is killed, --resume goes ahead."""
    model, run = _save_model(tmp_path / "tiny.onnx"), tmp_path / "run"
    argv = ["search", model, *SEARCH, "-o", run]
    code, _, err = _cli(capsys, *argv)
    assert code == 0, err
    assert not (run / LOCK_FILE).exists()  # let go at the end of the run
    trace = (run / "trace.jsonl").read_text()

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(run / LOCK_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in (["--resume"], []):
            code, _, err = _cli(capsys, *argv, *extra)
            assert code == 2 and "another ptqaudit process is writing" in err and str(run) in err, err
        assert (run / "trace.jsonl").read_text() == trace
    finally:
        holder.kill()  # a crash: the holder never lets go itself
        holder.wait()
    code, _, err = _cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert (run / "trace.jsonl").read_text() == trace
    assert not (run / LOCK_FILE).exists()


def test_two_run_folder_writers_in_one_process_exclude_each_other(tmp_path):
    """flock treats each open file as its own holder: a second RunFolder on the same folder is refused
    until the first closes, and an error inside the `with` block lets go too."""
    inputs = {"model_sha256": "m", "data_sha256": "d"}
    first = RunFolder(tmp_path / "run").start({"seed": 0}, False, inputs)
    with pytest.raises(PtqauditError, match="another ptqaudit process is writing"):
        RunFolder(tmp_path / "run").start({"seed": 0}, True, inputs)
    first.close()
    with pytest.raises(RuntimeError):
        with RunFolder(tmp_path / "run").start({"seed": 0}, True, inputs):
            raise RuntimeError("a failure mid-run")
    with RunFolder(tmp_path / "run").start({"seed": 0}, True, inputs):
        assert (tmp_path / "run" / LOCK_FILE).exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json"]


# --- --resume compares things, not strings --------------------------------------------------------

def test_resume_accepts_any_spelling_of_the_same_paths_and_refuses_a_changed_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _save_model(tmp_path / "model.onnx")
    code, _, err = _cli(capsys, "search", "model.onnx", *SEARCH, "-o", "run")
    assert code == 0, err
    trace = (tmp_path / "run" / "trace.jsonl").read_text()
    stored = json.loads((tmp_path / "run" / "run.json").read_text())["inputs"]
    assert stored["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()

    for model_name, output in (("./model.onnx", "./run"), (str(model), "run/"), ("model.onnx", str(tmp_path / "run"))):
        code, _, err = _cli(capsys, "search", model_name, *SEARCH, "-o", output, "--resume")
        assert code == 0, (model_name, output, err)
        assert (tmp_path / "run" / "trace.jsonl").read_text() == trace  # every evaluation replayed

    summary = (tmp_path / "run" / "summary.json").read_text()
    _save_model(model, seed=1)  # the same path, other weights
    code, _, err = _cli(capsys, "search", "model.onnx", *SEARCH, "-o", "run", "--resume")
    assert code == 2 and "the model file's content differs from what the run in run was made with" in err, err
    assert (tmp_path / "run" / "trace.jsonl").read_text() == trace
    assert (tmp_path / "run" / "summary.json").read_text() == summary
    code, _, err = _cli(capsys, "search", "model.onnx", *SEARCH[:-1], "--seed", "3", "--no-progress", "-o", "run",
                        "--resume")
    assert code == 2 and "the settings differ" in err and "seed" in err, err


def test_resume_takes_a_setting_the_stored_run_lacks_at_its_default(tmp_path, capsys):
    """A run made before a setting existed has no entry for it in run.json: it resumes when the setting is at its
    default now, and is refused, naming the setting, when it is not."""
    model = _save_model(tmp_path / "model.onnx")
    argv = ["search", model, *SEARCH, "-o", tmp_path / "run"]
    code, _, err = _cli(capsys, *argv)
    assert code == 0, err
    run_file = tmp_path / "run" / "run.json"
    run = json.loads(run_file.read_text())
    assert run["config"]["seed"] == SearchConfig.seed
    # seed, and two settings that versions before them did not store: all at their defaults here
    for setting in ("seed", "optimize", "device"):
        del run["config"][setting]
    run_file.write_text(json.dumps(run))
    code, _, err = _cli(capsys, *argv, "--resume")
    assert code == 0, err
    code, _, err = _cli(capsys, *argv[:-2], "--seed", str(SearchConfig.seed + 1), "-o", tmp_path / "run", "--resume")
    assert code == 2 and "the settings differ" in err and "seed" in err, err


def _digits_npz(path: Path, shift_train: float = 0.0) -> Path:
    test, train = (load_dataset(DataConfig(name="digits", split=split)) for split in ("test", "train"))
    np.savez(path, x_test=test.x, y_test=test.y, x_train=np.clip(train.x + shift_train, 0, 1), y_train=train.y)
    return path


def test_resume_refuses_data_whose_content_changed(tmp_path, capsys):
    """The search data (--search-split) are part of the data's identity: changing only them is refused."""
    model, data = _save_model(tmp_path / "tiny.onnx"), _digits_npz(tmp_path / "digits.npz")
    argv = ["search", model, "--data", data, "--search-split", "train", *SEARCH, "-o", tmp_path / "run"]
    code, _, err = _cli(capsys, *argv)
    assert code == 0, err
    code, _, err = _cli(capsys, *argv, "--resume")
    assert code == 0, err
    _digits_npz(data, shift_train=0.05)
    code, _, err = _cli(capsys, *argv, "--resume")
    assert code == 2 and "the loaded data differs" in err, err


def test_report_reuses_its_analysis_only_for_the_same_model_and_data(tmp_path, capsys):
    model, data = _save_model(tmp_path / "tiny.onnx"), _digits_npz(tmp_path / "digits.npz")
    run = tmp_path / "run"
    code, _, err = _cli(capsys, "search", model, "--data", data, *SEARCH, "-o", run)
    assert code == 0, err
    settings = AnalysisSettings(limit=40, batch_sizes=(1, 4), severities=(1,), budget_points=2)

    def cached(model_path=None) -> bool:
        return cached_analysis(load_run(run, model_path and str(model_path)), settings) is not None

    def measure(model_path=None) -> None:
        analyse(load_run(run, model_path and str(model_path)), settings, progress=False, echo=lambda m: None)

    assert not cached()
    measure()
    assert cached() and cached(shutil.copy(model, tmp_path / "copy.onnx"))  # another path, the same bytes
    other = _save_model(tmp_path / "other.onnx", seed=1)
    assert not cached(other)
    measure(other)
    stored = json.loads((run / "analysis.json").read_text())["inputs"]
    assert stored["model_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert cached(other) and not cached()
    _digits_npz(data, shift_train=0.05)  # the train split changed: the analysis reads only the test split
    assert cached(other)
    test = load_dataset(DataConfig(name=str(data)))
    np.savez(data, x_test=1 - test.x, y_test=test.y)
    assert not cached(other)


# --- a trace cut mid-line by a crash --------------------------------------------------------------

def test_a_trace_cut_mid_line_is_repaired_before_the_run_goes_on(tmp_path, capsys):
    model, run = _save_model(tmp_path / "tiny.onnx"), tmp_path / "run"
    argv = ["search", model, *SEARCH, "-o", run]
    code, _, err = _cli(capsys, *argv)
    assert code == 0, err
    whole = _records(run)
    lines = (run / "trace.jsonl").read_text().splitlines(keepends=True)
    kept = len(lines) // 2
    (run / "trace.jsonl").write_text("".join(lines[:kept]) + lines[kept][: len(lines[kept]) // 2])
    (run / "summary.json").unlink()

    code, out, err = _cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert (out + err).count("dropped its last line") == 1
    assert f"{kept} evaluations already in its trace are replayed" in out + err
    assert _records(run) == whole  # the cut record computed again, once; nothing glued, nothing twice

    code, out, err = _cli(capsys, *argv, "--resume")  # a second resume replays every evaluation
    assert code == 0 and "dropped" not in out + err, err
    assert f"{len(whole)} evaluations already in its trace are replayed" in out + err
    assert _records(run) == whole


# --- hand-edited or truncated run folders ----------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A search run with its cached analysis, and the search's argv."""
    root = tmp_path_factory.mktemp("runs")
    model, run = _save_model(root / "tiny.onnx"), root / "run"
    argv = ["search", str(model), *SEARCH, "-o", str(run)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    analyse(load_run(run), AnalysisSettings(limit=ANALYSIS_LIMIT), progress=False, echo=lambda m: None)
    return run, argv


DELETE = object()


def _report(capsys, run: Path, tmp_path: Path) -> tuple[int, str, str]:
    return _cli(capsys, "report", run, "--analysis-limit", ANALYSIS_LIMIT, "--no-progress", "-o", tmp_path / "r.md")


def _edit(document, field: tuple, value):
    *parents, last = field
    for key in parents:
        document = document[key]
    if value is DELETE:
        del document[last]
    else:
        document[last] = value


@pytest.mark.parametrize("file, field, value", [
    ("summary.json", ("worst", "ort_accuracy"), DELETE),
    ("summary.json", ("fp32_accuracy",), "81%"),
    ("summary.json", ("budget", "effective_bits"), DELETE),
    ("summary.json", ("worst", "candidates"), []),
    ("summary.json", ("worst", "candidates", 0, "sim_top1_agreement_with_ort"), None),
    ("summary.json", ("worst", "policy", "fc"), 8),
    ("summary.json", ("bits",), "2,4,8"),
    ("run.json", ("config",), DELETE),
    ("run.json", ("config", "batch_size"), "1"),
    ("run.json", ("config", "bits"), []),
    ("run.json", ("config", "data", "limit"), DELETE),
    ("run.json", ("config", "data", "mean"), "0.5"),
    ("analysis.json", ("per_input", "per_class", 0, "drop_points"), DELETE),
    ("analysis.json", ("batch_composition", "outlier_index"), "7"),
    ("analysis.json", ("budget_curves", "worst"), {}),
    ("analysis.json", ("corruptions", 1, "severity"), True),
    ("analysis.json", ("low_bit_frequency", "layers", "conv"), "0.5"),
])
def test_a_hand_edited_field_is_exit_2_naming_the_file_and_the_field(finished_run, tmp_path, capsys, file, field,
                                                                    value):
    run = Path(shutil.copytree(finished_run[0], tmp_path / "run"))
    document = json.loads((run / file).read_text())
    _edit(document, field, value)
    (run / file).write_text(json.dumps(document))
    code, _, err = _report(capsys, run, tmp_path)
    dotted = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in field).lstrip(".")
    assert code == 2 and f"{run / file}: field {dotted} " in err, err


@pytest.mark.parametrize("file", ["summary.json", "run.json", "analysis.json"])
@pytest.mark.parametrize("damage", ["cut", "not utf-8", "a list"])
def test_a_truncated_or_foreign_file_is_exit_2_naming_it(finished_run, tmp_path, capsys, file, damage):
    run = Path(shutil.copytree(finished_run[0], tmp_path / "run"))
    text = (run / file).read_bytes()
    (run / file).write_bytes({"cut": text[: len(text) // 2], "not utf-8": b"\xff\xfe" + text, "a list": b"[]"}[damage])
    if damage == "a list" and file == "analysis.json":  # not an analysis made this way: measured again
        assert cached_analysis(load_run(run), AnalysisSettings(limit=ANALYSIS_LIMIT)) is None
        return
    code, _, err = _report(capsys, run, tmp_path)
    assert code == 2 and str(run / file) in err and "internal error" not in err, err


@pytest.mark.parametrize("edit, phrase", [
    (lambda record: record.pop("sim_accuracy"), "line 3: field sim_accuracy is missing"),
    (lambda record: record.update(policy=["W8A8"]), "line 3: field policy is a list, expected an object"),
])
def test_a_hand_edited_trace_line_is_exit_2_naming_the_line_and_the_field(finished_run, tmp_path, capsys, edit, phrase):
    run = Path(shutil.copytree(finished_run[0], tmp_path / "run"))
    records = _records(run)
    edit(records[2])
    (run / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = finished_run[1]
    code, _, err = _cli(capsys, *argv[:-1], run, "--resume")
    assert code == 2 and f"{run / 'trace.jsonl'} {phrase}" in err, err


def test_a_line_glued_inside_the_trace_is_exit_2(finished_run, tmp_path, capsys):
    run = Path(shutil.copytree(finished_run[0], tmp_path / "run"))
    lines = (run / "trace.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20]  # what a resume used to append after a cut line
    (run / "trace.jsonl").write_text("".join(lines))
    code, _, err = _cli(capsys, *finished_run[1][:-1], run, "--resume")
    assert code == 2 and f"{run / 'trace.jsonl'} line 2: not a JSON record" in err, err


def test_a_hand_edited_distill_summary_is_exit_2(finished_run, tmp_path, capsys):
    """A distill run's summary.json names its audit folder; a missing field there is named too."""
    shutil.copytree(finished_run[0], tmp_path / "distilled" / "audit")
    (tmp_path / "distilled" / "summary.json").write_text(json.dumps({"mode": "detrimental", "audit": {"run": "audit"}}))
    code, _, err = _cli(capsys, "report", tmp_path / "distilled", "--no-analysis")
    assert code == 2 and f"{tmp_path / 'distilled' / 'summary.json'}: field teacher is missing" in err, err


# --- results files carry their layout's version; files from before it load as version 1 -------------

OLD_RUN = Path(__file__).parent / "fixtures" / "search-run-v1"  # written by `ptqaudit search` before schema_version


def test_a_run_folder_written_before_schema_versions_loads_as_version_1(tmp_path, capsys):
    run, model = Path(shutil.copytree(OLD_RUN, tmp_path / "run")), _save_model(tmp_path / "tiny.onnx")
    stored = json.loads((run / "summary.json").read_text())
    assert "schema_version" not in stored and "kind" not in stored
    loaded = load_run(run, str(model))
    assert loaded.summary.to_dict() == {"schema_version": 1, "kind": "search", **stored}
    # a run from before --sensitivity existed probed each operand; settings newer still come back at their defaults
    assert loaded.config.to_dict() == {**json.loads((run / "run.json").read_text())["config"], "sensitivity": "probes",
                                       "kernels": [], "optimize": "", "device": "cpu"}
    code, out, err = _cli(capsys, "report", run, "--model", model, "--no-analysis", "--json")
    assert code == 0, err
    headline = json.loads(out)["headline"]
    assert (headline["fp32_accuracy"], headline["worst_accuracy"], headline["best_accuracy"]) == (
        stored["fp32_accuracy"], stored["worst"]["ort_accuracy"], stored["best"]["ort_accuracy"])


def test_a_summary_of_an_unknown_schema_version_is_exit_2(finished_run, tmp_path, capsys):
    run = Path(shutil.copytree(finished_run[0], tmp_path / "run"))
    file = run / "summary.json"
    document = json.loads(file.read_text())
    assert document["schema_version"] == 1 and document["kind"] == "search"
    document["schema_version"] = 2
    file.write_text(json.dumps(document))
    code, _, err = _report(capsys, run, tmp_path)
    assert code == 2 and f"{file}: schema_version 2 is not one this ptqaudit reads (it reads 1)" in err, err
    document["schema_version"] = "1"
    file.write_text(json.dumps(document))
    code, _, err = _report(capsys, run, tmp_path)
    assert code == 2 and f"{file}: field schema_version is a string, expected an integer" in err, err


@pytest.mark.parametrize("version", [1, 99, "2"])
def test_a_cached_analysis_of_another_schema_version_is_measured_again(finished_run, tmp_path, capsys, version):
    run = Path(shutil.copytree(finished_run[0], tmp_path / "run"))
    file = run / "analysis.json"
    document = json.loads(file.read_text())
    assert document["schema_version"] == ANALYSIS_VERSION and document["kind"] == "analysis"
    document["schema_version"] = version
    file.write_text(json.dumps(document))
    assert cached_analysis(load_run(run), AnalysisSettings(limit=ANALYSIS_LIMIT)) is None
    code, _, err = _report(capsys, run, tmp_path)
    assert code == 0 and "analysing" in err, err
    assert json.loads(file.read_text())["schema_version"] == ANALYSIS_VERSION


def test_a_summary_of_an_unknown_kind_is_exit_2(finished_run, tmp_path, capsys):
    run = Path(shutil.copytree(finished_run[0], tmp_path / "run"))
    document = json.loads((run / "summary.json").read_text())
    document["kind"] = "training"
    (run / "summary.json").write_text(json.dumps(document))
    code, _, err = _cli(capsys, "report", run, "--no-analysis")
    assert code == 2 and f'{run / "summary.json"}: field kind is "training", expected search or distill' in err, err


def test_configs_round_trip_through_their_stored_form():
    data = DataConfig(name="digits", limit=7, mean=(0.5,), std=(0.25,))
    search = SearchConfig(model="m.onnx", data=data, output="out", bits=(2, 4), budget_avg_bits=None, budget_bitops=1000,
                          objective="worst", layers=("/conv*",), search_split="train", dynamic=True)
    assert SearchConfig.from_dict(json.loads(json.dumps(search.to_dict()))) == search
    distill = DistillConfig(teacher="t.onnx", data=data, output="out", mode="robust", bits=(4, 8), epochs=2, device="cuda")
    assert DistillConfig.from_dict(json.loads(json.dumps(distill.to_dict()))) == distill
