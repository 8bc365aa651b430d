"""Data and model files from others that try to run code, exhaust memory or overflow float32: each
is refused with exit 2 and one line naming the file, before any harm is done."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_tiny_digits_model
from test_cli import run_cli
from onnx import helper, numpy_helper

from ptqaudit import data
from ptqaudit.data import DataConfig, load_dataset
from ptqaudit.errors import PtqauditError

REPO = Path(__file__).resolve().parent.parent
DIGITS_MODEL = str(REPO / "sample_models" / "digits_cnn.onnx")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """Keep tests away from the user's cache and $PTQAUDIT_DATA."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("PTQAUDIT_DATA", raising=False)


# --- CIFAR-10 batches: pickles ----------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING) and names NumPy's modules as NumPy 1 did: the layout
    of the official CIFAR-10 release (made by Python 2)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__module__", None) == "numpy._core.multiarray":  # NumPy 2 spelling
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_dumps(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_cifar_folder(folder: Path, dumps=lambda obj: pickle.dumps(obj, protocol=2), per_batch: int = 12,
                       seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A cifar-10-batches-py folder with the official keys; returns {file: (data, labels)}."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    (folder / "batches.meta").write_bytes(dumps({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch}))
    batches = {}
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        pixels = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        filenames = [f"{name}_{i}.png".encode() for i in range(per_batch)]
        (folder / name).write_bytes(dumps({"batch_label": name, "labels": labels, "data": pixels, "filenames": filenames}))
        batches[name] = (pixels, labels)
    return batches


class MkdirPayload:
    """Unpickled by pickle.load, this creates a folder: a stand-in for any code a file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("dumps", [
    py2_dumps,  # the official release's layout
    lambda obj: pickle.dumps(obj, protocol=2),
    lambda obj: pickle.dumps(obj, protocol=4),
    lambda obj: pickle.dumps(obj, protocol=5),  # NumPy writes arrays through _frombuffer
], ids=["python2", "protocol2", "protocol4", "protocol5"])
def test_real_format_batches_load(tmp_path, dumps):
    batches = write_cifar_folder(tmp_path / "cifar-10-batches-py", dumps)
    for split, files in data.CIFAR10_SPLIT_FILES.items():
        dataset = load_dataset(DataConfig("cifar10", root=str(tmp_path), split=split))
        pixels = np.concatenate([batches[f][0] for f in files]).reshape(-1, 3, 32, 32)
        np.testing.assert_array_equal(dataset.x, pixels.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(dataset.y, np.concatenate([batches[f][1] for f in files]))
        assert dataset.classes == CIFAR_CLASSES


def test_a_python2_batch_is_what_the_official_release_holds(tmp_path):
    """The writer above makes what the official batches hold: BINSTRING data, NumPy 1 module names."""
    batch = py2_dumps({"data": np.zeros((1, 3072), np.uint8)})
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in batch and pickle.BINSTRING in batch
    assert b"_codecs" not in batch


@pytest.mark.parametrize("file_name", ["batches.meta", "test_batch"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_batch_that_would_run_code_is_refused_without_running_it(tmp_path, capsys, file_name, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_folder(folder)
    marker = tmp_path / "payload-ran"
    hostile = pickle.dumps({"data": MkdirPayload(marker), "labels": [0]}, protocol=protocol)
    (folder / file_name).write_bytes(hostile)

    code, _, err = run_cli(capsys, "eval", DIGITS_MODEL, "--data", "cifar10", "--data-root", str(tmp_path),
                           "--no-progress")
    assert code == 2
    assert f"refusing CIFAR-10 file {folder / file_name}: it asks for the global" in err and "mkdir" in err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists()
    pickle.loads(hostile)  # what a plain pickle.load does with the same bytes
    assert marker.exists()


def test_report_on_a_run_whose_data_would_run_code_is_refused(tmp_path, capsys):
    """A run folder received from elsewhere names its data in run.json; the report reads that data
    through the same loader."""
    run = tmp_path / "run"
    code, _, _ = run_cli(capsys, "search", DIGITS_MODEL, "--objective", "worst", "--method", "random",
                         "--max-evaluations", "4", "--limit", "40", "--search-limit", "20", "--verify-top", "1",
                         "--no-progress", "-o", str(run))
    assert code == 0
    folder = tmp_path / "received" / "cifar-10-batches-py"
    write_cifar_folder(folder)
    marker = tmp_path / "payload-ran"
    (folder / "test_batch").write_bytes(pickle.dumps({"data": MkdirPayload(marker)}, protocol=2))
    run_json = json.loads((run / "run.json").read_text())
    run_json["config"]["data"].update(name="cifar10", root=str(folder.parent), limit=None)
    (run / "run.json").write_text(json.dumps(run_json))

    code, _, err = run_cli(capsys, "report", str(run), "-o", str(tmp_path / "report.md"), "--no-progress")
    assert code == 2
    assert f"refusing CIFAR-10 file {folder / 'test_batch'}" in err
    assert not marker.exists()


def shared_tuple_key_bomb(depth: int) -> bytes:
    """{t: 1} where t = (t', t') nested `depth` deep through memo references: a few bytes whose key
    takes 2**depth steps to hash (depth 60 would never finish)."""
    return b"\x80\x02})q\x00" + b"h\x00h\x00\x86q\x00" * depth + b"K\x01s."


def deep_tuple_key(depth: int) -> bytes:
    """{((((),),),): 1} nested `depth` deep: one byte a level, and hashing it overflows the C stack."""
    return b"\x80\x02})" + pickle.TUPLE1 * depth + b"K\x01s."


@pytest.mark.parametrize("content, reason", [
    (shared_tuple_key_bomb(24), "refers twice to one tuple"),
    (deep_tuple_key(300_000), "a dict whose key is a tuple"),
    (b"\x80\x02]K\x002\x86.", "a duplicated object"),  # DUP: [0] paired with itself
    (pickle.dumps({"labels": {1, 2}}, protocol=4), "a set"),
    (pickle.dumps({"data": np.array([1, "a"], dtype=object)}, protocol=2), "not a plain number type"),
    (pickle.dumps({"data": np.zeros(2, dtype=[("r", "u1"), ("g", "u1")])}, protocol=2), "not a plain number type"),
    (pickle.dumps({"data": np.ma.masked_array([1, 2])}, protocol=2), "asks for the global numpy.ma.core"),
    (pickle.dumps({"data": np.zeros(3, np.uint8).view(np.recarray)}, protocol=2), "asks for the global numpy"),
], ids=["hash-bomb", "deep-key", "dup", "set", "object-array", "structured-dtype", "masked-array", "recarray"])
def test_content_a_batch_never_holds_is_refused(tmp_path, content, reason):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_folder(folder)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(PtqauditError, match=f"^refusing CIFAR-10 file {folder / 'test_batch'}: .*{reason}"):
        load_dataset(DataConfig("cifar10", root=str(tmp_path)))


@pytest.mark.parametrize("content, message", [
    (b"\x80\x02T\xff\xff\xff\x7fabc", "cannot read CIFAR-10 file"),  # a 2 GB string claimed, 3 bytes there
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 2**70]}, protocol=2), "class indices"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [[0], [1]]}, protocol=2), "class indices"),
    (pickle.dumps({"data": [[0] * 3072 for _ in range(2)], "labels": [0, 1]}, protocol=2), "got data list"),
], ids=["truncated", "huge-label", "nested-labels", "data-not-an-array"])
def test_damaged_batches_are_named(tmp_path, content, message):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_folder(folder)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(PtqauditError, match=message) as caught:
        load_dataset(DataConfig("cifar10", root=str(tmp_path)))
    assert str(folder / "test_batch") in str(caught.value)


# --- .npz: what the headers claim -------------------------------------------------------------------------


def write_npz_with_lying_header(path: Path, declared_shape: tuple[int, ...], descr: str = "|u1") -> None:
    """An .npz whose x.npy header declares `declared_shape` but holds 16 bytes of data."""
    x = io.BytesIO()
    np.lib.format.write_array_header_1_0(x, {"descr": descr, "fortran_order": False, "shape": declared_shape})
    x.write(bytes(16))
    y = io.BytesIO()
    np.save(y, np.zeros(2, np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", x.getvalue())
        archive.writestr("y.npy", y.getvalue())


def test_npz_header_claiming_more_than_its_member_holds_is_refused(tmp_path, capsys):
    path = tmp_path / "bomb.npz"
    write_npz_with_lying_header(path, (10**11, 1, 8, 8))
    assert path.stat().st_size < 1000
    code, _, err = run_cli(capsys, "eval", DIGITS_MODEL, "--data", str(path), "--no-progress")
    assert code == 2
    assert f"{path}: x declares shape (100000000000, 1, 8, 8) of uint8 (6,400,000,000,000 bytes)" in err


def test_npz_object_arrays_are_refused(tmp_path):
    write_npz_with_lying_header(tmp_path / "objects.npz", (2, 1, 2, 2), descr="|O")
    with pytest.raises(PtqauditError, match="x holds Python objects"):
        load_dataset(DataConfig(str(tmp_path / "objects.npz")))


def test_npz_larger_than_memory_is_refused_before_loading(tmp_path, monkeypatch):
    x, y = np.zeros((4, 1, 8, 8), np.uint8), np.arange(4)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    # the arrays, then the float32 pixels and int64 labels made of them
    needed = x.nbytes + y.nbytes + x.size * 4 + y.size * 8
    monkeypatch.setattr(data, "_physical_memory", lambda: needed)
    assert len(load_dataset(DataConfig(str(tmp_path / "d.npz")))) == 4
    monkeypatch.setattr(data, "_physical_memory", lambda: needed - 1)
    with pytest.raises(PtqauditError, match=r"d.npz: x is uint8 of shape \(4, 1, 8, 8\); loading it needs about"):
        load_dataset(DataConfig(str(tmp_path / "d.npz")))


def test_npz_labels_are_bounded_without_classes(tmp_path):
    x = np.zeros((2, 1, 2, 2), np.uint8)
    np.savez(tmp_path / "huge.npz", x=x, y=np.array([0, 10**12]))
    with pytest.raises(PtqauditError, match=r"y has labels up to 1,000,000,000,000.* add a classes array"):
        load_dataset(DataConfig(str(tmp_path / "huge.npz")))
    np.savez(tmp_path / "named.npz", x=x, y=np.array([0, 10**12]), classes=np.array(["a", "b"]))
    with pytest.raises(PtqauditError, match=r"labels 0\.\.1000000000000 but 2 classes"):
        load_dataset(DataConfig(str(tmp_path / "named.npz")))
    np.savez(tmp_path / "wide.npz", x=x, y=np.array([0, data.MAX_UNNAMED_CLASSES - 1]))
    assert len(load_dataset(DataConfig(str(tmp_path / "wide.npz"))).classes) == data.MAX_UNNAMED_CLASSES


# --- values that are not finite in float32 ----------------------------------------------------------------


FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("value", [1e300, -1e39, np.inf, np.nan])
def test_float_data_not_finite_in_float32_is_refused(tmp_path, value):
    x = np.full((2, 1, 2, 2), 0.5)
    x[1, 0, 1, 1] = value
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float32(value))  # what float32 makes of it
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    with pytest.raises(PtqauditError, match=r"dataset d.npz holds NaN, infinite or out-of-range values"):
        load_dataset(DataConfig(str(tmp_path / "d.npz")))


def test_largest_float32_values_are_kept(tmp_path):
    x = np.full((2, 1, 2, 2), FLOAT32_MAX)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    assert (load_dataset(DataConfig(str(tmp_path / "d.npz"))).x == np.float32(FLOAT32_MAX)).all()


@pytest.mark.parametrize("mean, std, message", [
    (None, (1e-45,), r"not finite in float32 after --std 1e-45: a --std near 0"),
    ((-3e38,), (0.5,), r"not finite in float32 after --mean -3e\+38 --std 0.5"),
    ((1e39,), None, r"--mean values must be finite float32 numbers"),
    (None, (1e-46,), r"--std values must be > 0 \(at least 1.4e-45 in float32\)"),
])
def test_normalisation_that_overflows_float32_is_refused(tmp_path, mean, std, message):
    x = np.full((2, 1, 2, 2), 1e30)  # finite in float32; 1e30 / 1e-45 and 1e30 + 3e38 / 0.5 are not
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    with pytest.raises(PtqauditError, match=message):
        load_dataset(DataConfig(str(tmp_path / "d.npz"), mean=mean, std=std))


def test_a_tiny_std_on_the_command_line_is_exit_2(capsys):
    code, _, err = run_cli(capsys, "eval", DIGITS_MODEL, "--std", "1e-45", "--limit", "10", "--no-progress")
    assert code == 2
    assert err.strip() == ("ptqaudit: error: dataset digits/test is not finite in float32 after --std 1e-45: a --std "
                           "near 0 or a huge --mean overflows float32 (largest 3.4e+38); give the data's real "
                           "per-channel statistics")


# --- models: symbolic input dims, graphs that ask for too much memory ------------------------------------


def symbolic_digits_model(tmp_path: Path) -> Path:
    """The tiny digits classifier (Conv 1->4 3x3 pad 1, Flatten, Gemm 256->10) with input [batch, 1, H, W]."""
    proto = build_tiny_digits_model("gemm")
    for dim, name in zip(proto.graph.input[0].type.tensor_type.shape.dim[2:], "HW"):
        dim.dim_param = name
    path = tmp_path / "symbolic.onnx"
    onnx.save_model(proto, str(path))
    return path


def test_layers_of_a_model_with_symbolic_height_and_width(tmp_path, capsys):
    path = symbolic_digits_model(tmp_path)
    code, _, err = run_cli(capsys, "layers", str(path))
    assert code == 2
    assert "[batch, 1, H, W] with symbolic H, W" in err and "--input-shape 1,H,W" in err
    code, out, _ = run_cli(capsys, "layers", str(path), "--input-shape", "1,8,8", "--json")
    assert code == 0
    macs = {layer["name"]: layer["macs"] for layer in json.loads(out)["layers"]}
    assert macs == {"conv": 4 * 8 * 8 * 1 * 3 * 3, "fc": 256 * 10}
    code, _, err = run_cli(capsys, "layers", str(path), "--input-shape", "3,8,8")
    assert code == 2 and "expects input [batch, 1, H, W] but the data (or --input-shape) gives [N, 3, 8, 8]" in err


def test_eval_search_and_report_take_symbolic_dims_from_the_data(tmp_path, capsys):
    path = symbolic_digits_model(tmp_path)
    code, out, _ = run_cli(capsys, "eval", str(path), "-p", "w8a8", "--limit", "20", "--no-progress", "--json")
    assert code == 0
    assert json.loads(out)["fp32_bitops"] == 32 * 32 * (4 * 8 * 8 * 9 + 256 * 10)
    run = tmp_path / "run"
    code, _, _ = run_cli(capsys, "search", str(path), "--objective", "worst", "--method", "random",
                         "--max-evaluations", "4", "--limit", "40", "--search-limit", "20", "--verify-top", "1",
                         "--no-progress", "-o", str(run))
    assert code == 0
    code, _, _ = run_cli(capsys, "report", str(run), "--no-analysis", "-o", str(tmp_path / "report.md"))
    assert code == 0


def memory_bomb_model(tmp_path: Path, floats_per_input: int) -> Path:
    """The tiny digits classifier plus a branch that fills a tensor of batch x `floats_per_input`
    floats (ConstantOfShape sized from the input's shape, so only a run can tell) and adds its
    minimum times 0 to the logits."""
    proto = build_tiny_digits_model("gemm")
    graph = proto.graph
    next(node for node in graph.node if node.name == "fc").output[0] = "fc_out"
    graph.initializer.extend([numpy_helper.from_array(np.array([floats_per_input], np.int64), "per_input"),
                              numpy_helper.from_array(np.array([0], np.int64), "zero"),
                              numpy_helper.from_array(np.array([1], np.int64), "one")])
    graph.node.extend([
        helper.make_node("Shape", ["input"], ["input_shape"], name="shape"),
        helper.make_node("Slice", ["input_shape", "zero", "one"], ["batch"], name="batch"),
        helper.make_node("Mul", ["batch", "per_input"], ["count"], name="count"),
        helper.make_node("ConstantOfShape", ["count"], ["filled"], name="fill"),
        helper.make_node("ReduceMin", ["filled"], ["smallest"], name="smallest", keepdims=0),
        helper.make_node("Mul", ["smallest", "smallest"], ["zero_f"], name="zero_f"),
        helper.make_node("Mul", ["zero_f", "zero_f"], ["nothing"], name="nothing"),
        helper.make_node("Add", ["fc_out", "nothing"], ["logits"], name="add"),
    ])
    onnx.checker.check_model(proto)
    path = tmp_path / "bomb.onnx"
    onnx.save_model(proto, str(path))
    return path


def test_a_model_asking_for_more_memory_than_exists_is_exit_2(tmp_path, capsys):
    """10^15 floats (4 PB) is beyond any machine and any address space, so ORT's allocation fails at
    once whatever the system's overcommit setting; the same model with 10 floats runs."""
    code, _, _ = run_cli(capsys, "eval", str(memory_bomb_model(tmp_path, 10)), "-p", "w8a8", "--limit", "5",
                         "--no-progress")
    assert code == 0
    path = memory_bomb_model(tmp_path, 10**15)
    code, _, err = run_cli(capsys, "eval", str(path), "-p", "w8a8", "--limit", "5", "--no-progress")
    assert code == 2
    assert err.strip() == (f"ptqaudit: error: onnxruntime cannot run {path} (fp32): its ConstantOfShape node 'fill' "
                           f"asks for {4 * 10**15:,} bytes, more memory than is available")


@pytest.mark.parametrize("command", [["eval", "--engine", "sim"], ["search", "--objective", "worst", "--method",
                                                                   "rl", "--max-evaluations", "2"]])
def test_a_model_asking_for_more_memory_than_exists_is_exit_2_in_the_simulator(tmp_path, capsys, command):
    """The simulator runs such a model instead of ORT (eval --engine sim), and in search its gradient pass
    runs it before ORT measures fp32: either way one line naming the node."""
    path = memory_bomb_model(tmp_path, 10**15)
    code, _, err = run_cli(capsys, command[0], str(path), *command[1:], "--limit", "5", "--no-progress",
                            *(["-o", str(tmp_path / "run")] if command[0] == "search" else ["-p", "w8a8"]))
    assert code == 2
    assert "ConstantOfShape node producing 'filled' asks for more memory than this machine has" in err
