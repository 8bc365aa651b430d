"""Run folders: the command line, resolved config, versions and hardware next to the results, written
atomically so an interrupted run leaves a consistent folder that --resume can continue."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import PtqauditError


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
    except (OSError, json.JSONDecodeError) as exc:
        raise PtqauditError(f"cannot read {path}: {exc}") from exc


def environment() -> dict:
    """Versions and hardware, so a result can be traced to what produced it."""
    import numpy
    import onnx
    import onnxruntime
    import torch

    from . import __version__

    return {
        "ptqaudit": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": numpy.__version__,
        "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class RunFolder:
    """One run's folder: run.json (argv, config, environment), a JSONL trace appended as work
    progresses, a checkpoint for --resume, and result files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def start(self, config: dict, resume: bool) -> None:
        run_file = self.path / "run.json"
        config = json.loads(json.dumps(config, default=_jsonable))  # as stored: tuples become lists
        if resume:
            if not run_file.is_file():
                raise PtqauditError(f"--resume: {self.path} holds no run to resume (no run.json)")
            previous = read_json(run_file)["config"]
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k)
                             and k not in ("resume",))
            if changed:
                raise PtqauditError(
                    f"--resume: the settings differ from the run in {self.path}: {', '.join(changed)}; "
                    "resume with the same settings or use a new -o folder"
                )
            return
        if run_file.exists():
            raise PtqauditError(f"{self.path} already holds a run; use --resume to continue it or another -o folder")
        write_json(run_file, {
            "argv": sys.argv, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config, "environment": environment(),
        })

    def append_trace(self, records: list[dict]) -> None:
        """Append whole lines, flushed, so an interrupted run keeps every record it finished."""
        with open(self.path / "trace.jsonl", "a") as f:
            for record in records:
                f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_trace(self) -> list[dict]:
        path = self.path / "trace.jsonl"
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash mid-write: everything before it is whole
        return records
