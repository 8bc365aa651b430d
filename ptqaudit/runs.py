"""Run folders: the command line, resolved config, versions and hardware next to the results, written
atomically by one process at a time so an interrupted run leaves a consistent folder that --resume can
continue; and the checks that a run folder read back holds what ptqaudit wrote."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import sys
import tempfile
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import PtqauditError

LOCK_FILE = ".lock"
TRACE_FILE = "trace.jsonl"
# Settings that say where a thing is, not what it is: --resume compares the things themselves (the model's
# and the data's content, in run.json's "inputs"), so ./m.onnx, m.onnx and /abs/m.onnx are the same run.
LOCATORS = frozenset({"model", "output", "data.name", "data.root", "data.download"})


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file or nothing: a temporary file beside it, then a rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise PtqauditError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _jsonable(value):
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=2, default=_jsonable) + "\n")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: invalid JSON or not UTF-8
        raise PtqauditError(f"cannot read {path}: {exc}") from exc


def environment() -> dict:
    """Versions and hardware, so a result can be traced to what produced it."""
    import onnx
    import onnxruntime
    import torch

    from . import __version__
    from .kernels import cpu_description, detect_kernel_family

    return {
        "ptqaudit": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
        "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": cpu_description(), "kernel_family": detect_kernel_family(),
    }


def input_identity(model_path: str | Path, datasets) -> dict:
    """What a run was made from, by content: the model file's sha256 and one sha256 over the loaded
    examples of each dataset (pixels after scaling and normalisation, and labels), whatever paths named them."""
    model = hashlib.sha256()
    try:
        with open(model_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                model.update(block)
    except OSError as exc:
        raise PtqauditError(f"cannot read {model_path}: {exc.strerror or exc}") from exc
    data = hashlib.sha256()
    for dataset in datasets:
        arrays = dataset.x.digest_arrays() if dataset.is_text else [dataset.x]
        for array in (*arrays, dataset.y):
            data.update(f"{array.dtype.str}{array.shape};".encode())
            data.update(np.ascontiguousarray(array))
    return {"model_sha256": model.hexdigest(), "data_sha256": data.hexdigest()}


class RunFolder:
    """One run's folder: run.json (argv, config, inputs, environment), a JSONL trace appended as work
    progresses, a checkpoint for --resume, and result files. A process writes it between `start` and
    `close` (or the end of a `with` block) and holds RUN/.lock meanwhile, so a second process is refused."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def start(self, config: dict, resume: bool, inputs: dict, echo=print, defaults: dict | None = None,
              nulls: dict | None = None) -> RunFolder:
        """Take the folder's lock, then begin a new run (run.json) or, with resume, check that the run
        there has the same settings and inputs and repair a trace cut by a crash. Returns self. defaults
        (setting_defaults): what a setting the stored run lacks is taken to have been, so that a run made
        before a setting existed resumes under a version that has it, at its default. nulls: what a setting the
        stored run holds as null is taken to have been (a version that stored a default unresolved)."""
        self._lock()
        try:
            as_stored = json.loads(json.dumps(config, default=_jsonable))  # tuples become lists, as in run.json
            stored_defaults, stored_nulls = (json.loads(json.dumps(values or {}, default=_jsonable))
                                             for values in (defaults, nulls))
            self._begin(as_stored, resume, inputs, echo, stored_defaults, stored_nulls)
        except BaseException:
            self.close()
            raise
        return self

    def _begin(self, config: dict, resume: bool, inputs: dict, echo, defaults: dict, nulls: dict) -> None:
        run_file = self.path / "run.json"
        if not resume:
            if run_file.exists():
                raise PtqauditError(f"{self.path} already holds a run; use --resume to continue it or another -o folder")
            write_json(run_file, {
                "argv": sys.argv, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "config": config, "inputs": inputs, "environment": environment(),
            })
            return
        if not run_file.is_file():
            raise PtqauditError(f"--resume: {self.path} holds no run to resume (no run.json)")
        previous = read_checked(run_file, RUN_FILE)
        now = _flat(config)
        before = {**{k: v for k, v in _flat(defaults).items() if k in now}, **_flat(previous["config"])}
        before.update({k: v for k, v in _flat(nulls).items() if k in before and before[k] is None})
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in LOCATORS)
        if changed:
            raise PtqauditError(
                f"--resume: the settings differ from the run in {self.path}: {', '.join(changed)}; "
                "resume with the same settings or use a new -o folder"
            )
        for key, what in (("model_sha256", "the model file's content"), ("data_sha256", "the loaded data")):
            if previous["inputs"][key] != inputs[key]:
                raise PtqauditError(
                    f"--resume: {what} differs from what the run in {self.path} was made with (sha256 "
                    f"{inputs[key][:12]}… against {previous['inputs'][key][:12]}… in run.json); resume with the "
                    "same model and data or use a new -o folder"
                )
        self._repair_trace(echo)

    def _lock(self) -> None:
        """Hold RUN/.lock (flock, not waiting): the system lets go when the process ends, however it ends,
        so a crashed run leaves no stale lock."""
        lock = self.path / LOCK_FILE
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            while self._lock_fd is None:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise PtqauditError(f"another ptqaudit process is writing the run folder {self.path} (it holds "
                                        f"{lock}); wait for it to end or use another -o folder") from None
                try:
                    same_file = os.path.samestat(os.fstat(fd), os.stat(lock))
                except FileNotFoundError:
                    same_file = False
                if same_file:
                    self._lock_fd = fd
                else:  # the previous holder removed the file as it let go: lock the one now at that path
                    os.close(fd)
        except OSError as exc:
            raise PtqauditError(f"cannot lock the run folder {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Let go of the lock; the lock file goes first, while still held, so nobody locks a file about to vanish."""
        if self._lock_fd is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def append_trace(self, records: list[dict]) -> None:
        """Append whole lines, flushed, so an interrupted run keeps every record it finished."""
        with open(self.path / TRACE_FILE, "a") as f:
            for record in records:
                f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _trace_bytes(self) -> tuple[bytes, int]:
        """The trace file and the length of its whole lines: a last line without its newline was cut by a crash."""
        path = self.path / TRACE_FILE
        try:
            data = path.read_bytes() if path.exists() else b""
        except OSError as exc:
            raise PtqauditError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return data, data.rfind(b"\n") + 1

    def _repair_trace(self, echo) -> None:
        """Drop a last line cut by a crash before anything is appended to it (said once)."""
        data, whole = self._trace_bytes()
        if whole < len(data):
            write_atomic(self.path / TRACE_FILE, data[:whole])
            echo(f"{self.path / TRACE_FILE}: dropped its last line ({len(data) - whole} bytes), cut short when the "
                 "run stopped mid-write; the whole lines before it are kept")

    def read_trace(self) -> list[dict]:
        """The search trace's records, each checked; a last line cut by a crash is left out."""
        data, whole = self._trace_bytes()
        records = []
        for number, line in enumerate(data[:whole].splitlines(), 1):
            where = f"{self.path / TRACE_FILE} line {number}"
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise PtqauditError(f"{where}: not a JSON record ({exc}); the trace was changed since ptqaudit "
                                    "wrote it") from None
            check_fields(record, TRACE_RECORD, where)
            records.append(record)
        return records


def setting_defaults(config_class) -> dict:
    """The default of each top-level setting of a config dataclass that has one (RunFolder.start's defaults)."""
    return {f.name: f.default for f in fields(config_class) if f.default is not MISSING}


def _flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one level of dotted names (data.limit), so a difference is named precisely."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- what a run folder's files must hold: the fields ptqaudit reads back, checked once at load -------
# A schema is a type (float admits int, neither admits bool), None (JSON null), a tuple of alternatives,
# a dict of required fields ("name?" for an optional one), ListOf(item) or MapOf(value).

@dataclass(frozen=True)
class ListOf:
    item: object
    at_least: int = 0


@dataclass(frozen=True)
class MapOf:
    value: object  # any field names, each holding this


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null",
          dict: "an object", list: "a list"}


def _describe(schema) -> str:
    if isinstance(schema, tuple):
        return " or ".join(_describe(s) for s in schema)
    if schema is None or isinstance(schema, type):
        return _KINDS[type(None) if schema is None else schema]
    if isinstance(schema, ListOf):
        return "a non-empty list" if schema.at_least else "a list"
    return "an object"


def _problem(value, schema, field: str) -> tuple[str, str] | None:
    """(field, what is wrong) for the first field of `value` that `schema` does not admit, else None."""
    kinds = [s for s in (schema if isinstance(schema, tuple) else (schema,)) if _matches_kind(value, s)]
    if not kinds:
        return field, f"is {_kind_of(value)}, expected {_describe(schema)}"
    kind = kinds[0]
    if isinstance(kind, ListOf):
        if len(value) < kind.at_least:
            return field, "is an empty list, expected at least one entry"
        return next((p for i, item in enumerate(value) if (p := _problem(item, kind.item, f"{field}[{i}]"))), None)
    if isinstance(kind, MapOf):
        return next((p for key, item in value.items() if (p := _problem(item, kind.value, _join(field, key)))), None)
    if isinstance(kind, dict):
        for key, item_schema in kind.items():
            name = key.removesuffix("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                return _join(field, name), f"is missing (expected {_describe(item_schema)})"
            if (p := _problem(value[name], item_schema, _join(field, name))) is not None:
                return p
    return None


def _join(field: str, key: str) -> str:
    key = key if len(key) <= 60 else key[:59] + "…"  # a field name from the file: never quote an unbounded one
    return f"{field}.{key}" if field else key


def _matches_kind(value, schema) -> bool:
    """Whether value is of the JSON kind schema asks for (its contents are checked by _problem)."""
    if schema is None:
        return value is None
    if isinstance(schema, ListOf):
        return isinstance(value, list)
    if isinstance(schema, (MapOf, dict)):
        return isinstance(value, dict)
    if isinstance(value, bool):
        return schema is bool
    return isinstance(value, (int, float)) if schema is float else isinstance(value, schema)


def _kind_of(value) -> str:
    return next((name for kind, name in _KINDS.items() if type(value) is kind), type(value).__name__)


def check_fields(value, schema, where: str | Path, hint: str = "") -> None:
    """Raise PtqauditError naming the file (`where`) and the first field that does not hold what ptqaudit
    wrote there: a hand-edited or cut-short file is bad input, not a crash further on."""
    problem = _problem(value, schema, "")
    if problem is not None:
        field, what = problem
        subject = f"field {field}" if field else "the file"
        raise PtqauditError(f"{where}: {subject} {what}; the file was changed since ptqaudit wrote it{hint}")


def check_schema_version(value, where: str | Path, supported: int, hint: str = "") -> None:
    """Refuse a results file written in a layout this ptqaudit does not read. A file without schema_version
    was written before the field existed: version 1."""
    version = value.get("schema_version", 1) if isinstance(value, dict) else 1
    if type(version) is not int:
        raise PtqauditError(f"{where}: field schema_version is {_kind_of(version)}, expected an integer; the file was "
                            f"changed since ptqaudit wrote it{hint}")
    if version != supported:
        raise PtqauditError(f"{where}: schema_version {version} is not one this ptqaudit reads (it reads {supported}); "
                            f"use the ptqaudit version that wrote the file{hint}")


def known_fields(cls, values: dict) -> dict:
    """The entries of `values` that name fields of dataclass `cls` (a file may hold more, for other readers)."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in values.items() if key in names}


def dataclass_from_dict(cls, values: dict, **nested):
    """An instance of dataclass `cls` from what asdict wrote: keys it has no field for are left out, lists
    become tuples again, fields named in `nested` (name=class) are built the same way; missing ones take
    their defaults."""
    values = {key: tuple(v) if isinstance(v, list) else v for key, v in known_fields(cls, values).items()}
    for name, kind in nested.items():
        if name in values:
            values[name] = dataclass_from_dict(kind, values[name])
    return cls(**values)


def typed_from_dict(cls, values: dict):
    """An instance of dataclass `cls` from what asdict wrote, nested dataclasses rebuilt by the field
    annotations (also inside lists, tuples, dicts and `X | None`); keys it has no field for are left out."""
    hints = typing.get_type_hints(cls)
    return cls(**{key: _typed(hints[key], value) for key, value in known_fields(cls, values).items()})


def _typed(hint, value):
    if value is None:
        return None
    if is_dataclass(hint):
        return typed_from_dict(hint, value)
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        return origin(_typed(arguments[0], item) for item in value)
    if origin is dict:
        return {key: _typed(arguments[1], item) for key, item in value.items()}
    if origin in (typing.Union, types.UnionType):
        (present,) = [argument for argument in arguments if argument is not type(None)]
        return _typed(present, value)
    return value


def without_none(values: dict, keys) -> dict:
    """values less the `keys` that hold None: optional results are absent from a file rather than null."""
    return {key: value for key, value in values.items() if not (key in keys and value is None)}


def read_checked(path: Path, schema, hint: str = ""):
    """read_json, then check_fields."""
    value = read_json(path)
    check_fields(value, schema, path, hint)
    return value


NAMES = MapOf(str)  # layer name -> setting label
DATA_SETTINGS = {"name": str, "root": (str, None), "split": str, "limit": (int, None), "mean": (ListOf(float), None),
                 "std": (ListOf(float), None), "download": bool,
                 "text?": {"tokenizer": (str, None), "max_length": int, "padding": str, "text_column": (str, None),
                           "label_column": str}}
RUN_FILE = {"config": {}, "inputs": {"model_sha256": str, "data_sha256": str}}  # what --resume compares
SEARCH_RUN_FILE = {"config": {"model": str, "data": DATA_SETTINGS, "output": str, "batch_size": int,
                              "bits": ListOf(int, 1), "base_policy?": str}}
TRACE_RECORD = {"step": int, "objective": str, "method": str, "digest": str, "sim_accuracy": float, "bitops": int,
                "effective_bits": float, "policy": NAMES}
_CANDIDATE = {"rank": int, "digest": str, "ort_accuracy": float, "sim_accuracy_search_subset": float,
              "sim_top1_agreement_with_ort": float, "bitops": int, "effective_bits": float, "layers": NAMES}
_CASE = {"ort_accuracy": float, "drop_points": float, "policy_file": str, "evaluations": int, "policy": NAMES,
         "candidates": ListOf(_CANDIDATE, 1), "dynamic?": {}}
SEARCH_SUMMARY = {"dataset": str, "images": int, "batch_size": int, "budget": {"effective_bits": float},
                  "bits": ListOf(int), "method": str, "fp32_accuracy": float, "worst?": _CASE, "best?": _CASE,
                  "spread_points?": float}
DISTILL_SUMMARY = {"mode": str, "teacher": str, "student_file": str, "audit": {"run": str, "worst_accuracy": float, "drop_points": float, "policy_file": str,
                                                                             "evaluations": int},
                   **{f"{name}_accuracy": float for name in ("teacher_fp32", "teacher_policy", "student_fp32",
                                                             "student_policy", "student_w8a8")},
                   "policy_drop_points": float, "policy_effective_bits": float, "unit?": str, "hardening?": str,
                   "teacher_audit?": {"run": str, "worst_accuracy": float, "drop_points": float, "policy_file": str,
                                      "evaluations": int}}
_ACCURACIES = {"fp32_accuracy": float, "worst_accuracy": float, "drop_points": float}
_CORRUPTIONS = ListOf({"corruption": str, "severity": int, **_ACCURACIES})
_BATCH_SIZES = ListOf({"batch_size": int, "worst_accuracy": float})
_CURVE = ListOf({"budget_effective_bits": float, "policy_effective_bits": float, "ort_accuracy": float, "digest": str})
ANALYSIS = {
    "settings": {"limit": int, "batch_sizes": ListOf(int), "composition_batch": int, "severities": ListOf(int),
                 "budget_points": int, "worst_policies": int, "ship_policy": str, "kernels": ListOf(str)},
    "inputs": MapOf(str), "dataset": str, "images": int, "batch_size": int, "fp32_accuracy": float,
    "worst_accuracy": float, "base_policy": str,
    "layer_sensitivity": ListOf({"layer": str, "bits": int, "accuracy": float, "drop_points": float}),
    "teacher_layer_sensitivity?": ListOf({"layer": str, "bits": int, "accuracy": float, "drop_points": float}),
    "low_bit_frequency": {"policies": int, "layers": MapOf(float)},
    "budget_curves": {"worst": _CURVE, "best": _CURVE},
    "per_input": {"images": int, "flipped": int, "flipped_fraction": float, "mean_range_score_flipped": (float, None),
                  "mean_range_score_kept": (float, None),
                  "per_class": ListOf({"class_name": str, "images": int, **_ACCURACIES}),
                  "flipped_inputs": ListOf({"index": int, "class_name": str, "fp32_label": str, "worst_label": str,
                                            "range_score": float, "text?": (str, None)})},
    "batch_sizes": _BATCH_SIZES,
    "batch_composition": {"batch_size": int, "outlier_index": int, "outlier_class": str, "outlier_range_score": float,
                          "alone_accuracy": float, "ordinary_batches_accuracy": float, "with_outlier_accuracy": float},
    "corruptions": _CORRUPTIONS, "corruptions_skipped?": str,
    "unit?": str, "by_length?": ListOf({"tokens": str, "sentences": int, **_ACCURACIES}),
    "padding?": ListOf({"padding": str, "scenario": str, **_ACCURACIES}),
    "kernel_family?": str,
    "ship_policy?": {"policy": str, "description": str, "effective_bits": float, "images": int, "fp32_accuracy": float,
                     "kernels": ListOf({"kernel_family": str, "source": str, "accuracy": float, "drop_points": float,
                                        "batch_sizes": _BATCH_SIZES, "corruptions": _CORRUPTIONS}, 1),
                     "mitigations": ListOf({"change": str, "policy": str, "kernels": MapOf(float)})},
}
