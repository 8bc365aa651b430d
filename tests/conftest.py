"""Fixtures shared by the test files."""

import os
from pathlib import Path

import pytest


@pytest.fixture
def cifar10_root() -> str:
    """The real CIFAR-10 folder named by $PTQAUDIT_TEST_CIFAR10_ROOT (the folder holding
    cifar-10-batches-py, or that folder itself); skips the test when it is not available."""
    root = os.environ.get("PTQAUDIT_TEST_CIFAR10_ROOT")
    if root:
        path = Path(root)
        if (path / "cifar-10-batches-py" / "batches.meta").is_file() or (path / "batches.meta").is_file():
            return root
    pytest.skip(
        "CIFAR-10 folder not available: set PTQAUDIT_TEST_CIFAR10_ROOT to the folder holding "
        "cifar-10-batches-py (e.g. one built by ../shared/data/make_cifar10.py)"
    )


@pytest.fixture(scope="session")
def sst2_root() -> str:
    """GLUE's SST-2 folder (train.tsv, dev.tsv) named by $PTQAUDIT_TEST_SST2_ROOT (that folder or the one holding
    SST-2/); skips the test when it is not available."""
    root = os.environ.get("PTQAUDIT_TEST_SST2_ROOT")
    if root and any((Path(root) / sub / "dev.tsv").is_file() for sub in ("", "SST-2")):
        return root
    pytest.skip("SST-2 folder not available: set PTQAUDIT_TEST_SST2_ROOT to a folder holding SST-2's train.tsv and "
                "dev.tsv (e.g. ../shared/data/SST-2.tar.gz extracted)")


@pytest.fixture(scope="session")
def resnet20_path() -> Path:
    """The shared pretrained CIFAR-10 ResNet-20: $PTQAUDIT_TEST_RESNET20, else
    ../shared/models/cifar10_resnet20.onnx next to the repository; skips the test when absent."""
    env = os.environ.get("PTQAUDIT_TEST_RESNET20")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "models" / "cifar10_resnet20.onnx"
    if not path.is_file():
        pytest.skip(
            f"ResNet-20 model not found at {path}: set PTQAUDIT_TEST_RESNET20 to cifar10_resnet20.onnx "
            "(the shared pretrained CIFAR-10 ResNet-20)"
        )
    return path


# --- tiny ONNX classifiers built with onnx.helper (independent of sample_models/) -------------

import functools  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

TINY_OPSET = 17


def make_model(graph, opset_imports) -> onnx.ModelProto:
    """helper.make_model at the oldest IR version its opsets allow: make_model's own default, the onnx library's
    newest, is refused by an onnxruntime older than that library (onnx 1.23 writes IR 14, onnxruntime 1.30 reads 13)."""
    return helper.make_model(graph, opset_imports=opset_imports,
                             ir_version=helper.find_min_ir_version_for(opset_imports, ignore_unknown=True))


def _conv2d_same_3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NumPy Conv 3x3, stride 1, pad 1 (NCHW, weight [Cout, Cin, 3, 3])."""
    n, _, h, wd = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd), dtype=np.float64)
    for dy in range(3):
        for dx in range(3):
            patch = padded[:, :, dy : dy + h, dx : dx + wd]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx])
    return out + b.reshape(1, -1, 1, 1)


@functools.lru_cache(maxsize=None)
def tiny_digits_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Conv(1->4, 3x3) weights from a fixed seed; the 256->10 head fitted by ridge least squares on the
    digits train split so that the classifier is far better than chance (quantization then matters)."""
    from ptqaudit.data import DataConfig, load_dataset

    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.5, size=(4, 1, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, size=(4,)).astype(np.float32)
    train = load_dataset(DataConfig(name="digits", split="train"))
    features = np.maximum(_conv2d_same_3x3(train.x.astype(np.float64), conv_w, conv_b), 0).reshape(len(train), -1)
    features = np.hstack([features, np.ones((len(features), 1))])
    targets = np.eye(10)[train.y]
    solution = np.linalg.solve(features.T @ features + 1e-1 * np.eye(features.shape[1]), features.T @ targets)
    return {"conv_w": conv_w, "conv_b": conv_b,
            "fc_w": solution[:-1].astype(np.float32), "fc_b": solution[-1].astype(np.float32)}


def build_tiny_digits_model(head: str = "gemm", seed: int = 0) -> onnx.ModelProto:
    """input [batch,1,8,8] -> Conv "conv" (1->4, 3x3, pad 1) -> Relu -> Flatten -> head -> logits [batch,10].
    head "gemm": one Gemm "fc" (256->10); head "matmul": MatMul "fc" + Add "fc_bias_add"."""
    w = tiny_digits_weights(seed)
    inits = [numpy_helper.from_array(w["conv_w"], "conv_w"), numpy_helper.from_array(w["conv_b"], "conv_b"),
             numpy_helper.from_array(w["fc_w"], "fc_w"), numpy_helper.from_array(w["fc_b"], "fc_b")]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        helper.make_node("Flatten", ["relu_out"], ["flat"], name="flatten", axis=1),
    ]
    if head == "gemm":
        nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"))
    elif head == "matmul":
        nodes += [helper.make_node("MatMul", ["flat", "fc_w"], ["fc_out"], name="fc"),
                  helper.make_node("Add", ["fc_out", "fc_b"], ["logits"], name="fc_bias_add")]
    else:
        raise ValueError(head)
    graph = helper.make_graph(
        nodes, "tiny_digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = make_model(graph, opset_imports=[helper.make_opsetid("", TINY_OPSET)])
    onnx.checker.check_model(model)
    return model


def _saved_tiny_model(tmp_path: Path, file_name: str, head: str) -> Path:
    path = tmp_path / "models" / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build_tiny_digits_model(head), str(path))
    return path


@pytest.fixture
def tiny_digits_model(tmp_path) -> Path:
    """A Conv+Relu+Flatten+Gemm digits classifier saved as tmp_path/models/tiny.onnx."""
    return _saved_tiny_model(tmp_path, "tiny.onnx", "gemm")


@pytest.fixture
def tiny_matmul_model(tmp_path) -> Path:
    """The same classifier with a MatMul + Add head, saved as tmp_path/models/tiny_matmul.onnx."""
    return _saved_tiny_model(tmp_path, "tiny_matmul.onnx", "matmul")


@pytest.fixture(scope="session")
def ort_kernel_family() -> str:
    """This machine's ORT integer-kernel family, probed here independently of ptqaudit.kernels: a
    MatMulInteger of random full-range codes that matches exact int32 arithmetic or the AVX2 pairwise
    int16-saturating one (tests/numpy_reference.py), and never both."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from numpy_reference import matmul_integer

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 64), dtype=np.uint8)
    b = rng.integers(-127, 128, (64, 16)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [8, 64]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [64, 16])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [8, 16])])
    session = ort.InferenceSession(make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"a": a, "b": b})
    matches = [f for f in ("exact", "avx2-u8s8") if np.array_equal(got, matmul_integer(a, 0, b, 0, f))]
    assert len(matches) == 1, f"ORT's MatMulInteger matches no known kernel family (or both): {matches}"
    print(f"ORT kernel family on this machine: {matches[0]}")
    return matches[0]
