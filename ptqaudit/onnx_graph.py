"""Loading an ONNX classifier safely and finding its quantizable layers, their shapes and MACs."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .data import format_dim, format_shape, is_free_dim
from .errors import PtqauditError
from .layer_kinds import KINDS, LayerKind


@dataclass(frozen=True)
class Layer:
    """One quantizable node: a Conv, MatMul or Gemm whose weight is a constant initializer."""

    name: str
    op_type: str
    index: int  # position among the model's quantizable layers, in graph order
    weight_name: str
    weight_shape: tuple[int, ...]
    output_shape: tuple[int | str, ...]  # per inferred shapes; the batch dim stays symbolic
    macs: int  # multiply-accumulates for one input sample
    params: int  # weight and bias elements
    output_channels: int  # what a per-channel weight scale runs along: Conv filters, MatMul/Gemm columns (N)

    @property
    def kind(self) -> LayerKind:
        return KINDS[self.op_type]


@dataclass
class LoadedModel:
    path: Path
    proto: onnx.ModelProto
    layers: list[Layer]
    input_name: str
    input_shape: tuple[int | str | None, ...]
    num_classes: int | None  # None where the output width is only known at run time

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)


def _all_tensors(graph: onnx.GraphProto):
    """Every tensor stored in a graph: initializers and constant attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def _check_external_data(model: onnx.ModelProto, model_dir: Path) -> None:
    """Refuse external-data references that leave the model's folder, before anything is read."""
    base = model_dir.resolve()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise PtqauditError(
                f"refusing model: tensor {tensor.name!r} references external data {location!r} "
                f"outside the model's folder {base}"
            )
        if not target.is_file():
            raise PtqauditError(f"model tensor {tensor.name!r} references missing external data file {target}")


def read_model(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure is one clear PtqauditError."""
    path = Path(path)
    if not path.exists():
        raise PtqauditError(f"model file not found: {path}")
    if not path.is_file():
        raise PtqauditError(f"model path is not a file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file, or truncated
        raise PtqauditError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node:
        raise PtqauditError(f"{path} is not a readable ONNX model (it has no graph nodes)")
    _check_external_data(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise PtqauditError(f"{path} is not a valid ONNX model: {str(exc).splitlines()[0]}") from exc
    return model


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
    )


def _image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializer_names = {init.name for init in model.graph.initializer}
    return next(i for i in model.graph.input if i.name not in initializer_names)


def _with_input_shape(model: onnx.ModelProto, shape: Sequence) -> onnx.ModelProto:
    """A copy of the model whose image input declares `shape` (where `shape` gives a number)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for dim, size in zip(_image_input(fixed).type.tensor_type.shape.dim, shape):
        if not is_free_dim(size):
            dim.dim_value = size
    return fixed


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the named intermediate tensors, as extra graph outputs
    (untyped: ONNX Runtime takes their types from the graph)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return exposed


def _layer_output_shapes(model: onnx.ModelProto, input_shape, names: list[str], model_name: str) -> dict[str, tuple]:
    """Output shape of each named tensor: ONNX shape inference, or one ORT run of a zero input when
    inference leaves a non-batch dimension unknown (Slice/Reshape chains often defeat it).
    `input_shape` may fix dims the model leaves symbolic (from the data or --input-shape)."""
    declared = _dims(_image_input(model)) or ()
    sized = model if tuple(input_shape) == declared else _with_input_shape(model, input_shape)
    try:
        inferred = onnx.shape_inference.infer_shapes(sized, data_prop=True)
        shapes = {vi.name: _dims(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    except Exception:
        shapes = {}
    wanted = {n: shapes.get(n) for n in names}
    if all(s is not None and all(isinstance(d, int) for d in s[1:]) for s in wanted.values()):
        return wanted
    symbolic = [format_dim(d) for d in input_shape[1:] if is_free_dim(d)]
    if symbolic:
        example = ",".join(format_dim(d) for d in input_shape[1:])
        raise PtqauditError(
            f"model input {_image_input(model).name!r} is {format_shape(input_shape)} with symbolic "
            f"{', '.join(symbolic)}, and the layers' shapes and MACs depend on them: give one input's shape, "
            f"--input-shape {example} with numbers for {', '.join(symbolic)} (eval, search, distill and report "
            "take it from the data)"
        )
    import onnxruntime as ort

    probe = with_outputs(sized, names)
    sample_shape = [1 if is_free_dim(d) else d for d in input_shape]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # ORT's error log repeats the exception, which becomes the one line shown
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        outputs = session.run(names, {input_name: np.zeros(sample_shape, dtype=np.float32)})
    except ort_errors() as exc:
        raise ort_failure(exc, model_name, "finding its layers' shapes") from exc
    return {n: ("batch",) + tuple(int(d) for d in out.shape[1:]) for n, out in zip(names, outputs)}


def ort_errors() -> tuple[type[Exception], ...]:
    """The exceptions onnxruntime raises for a failed status: a model it cannot run, an input it
    refuses, memory it cannot allocate. Failures of the model, not of ptqaudit."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidArgument, state.RuntimeException, state.NotImplemented, state.InvalidGraph,
            state.EPFail)


def ort_failure(exc: Exception, model: str, doing: str) -> PtqauditError:
    """The one-line error for an ORT failure while `doing` something with `model`."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    allocation = re.search(r"Failed to allocate memory for requested buffer of size (\d+)", message)
    if allocation:
        node = re.search(r"running (\w+) node\. Name:'([^']*)'", message)
        where = f"its {node[1]} node {node[2]!r}" if node else "it"
        return PtqauditError(
            f"onnxruntime cannot run {model} ({doing}): {where} asks for {int(allocation[1]):,} bytes, "
            "more memory than is available"
        )
    return PtqauditError(f"onnxruntime cannot run {model} ({doing}): {message}")


def find_layers(model: onnx.ModelProto, input_shape, model_name: str = "the model") -> list[Layer]:
    initializers = {init.name: init for init in model.graph.initializer}
    candidates = []
    for node in model.graph.node:
        if node.op_type in KINDS:
            weight = KINDS[node.op_type].weight_input(node, initializers)
            if weight is not None:
                candidates.append((node, weight))
    unnamed = [n for n, _ in candidates if not n.name]
    if unnamed:
        raise PtqauditError(
            f"model has {len(unnamed)} unnamed {unnamed[0].op_type} node(s): policies address layers by "
            "ONNX node name, so name every node (e.g. re-export the model)"
        )
    names = [node.name for node, _ in candidates]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PtqauditError(
            f"model has several quantizable nodes named {', '.join(map(repr, duplicates))}: policies address "
            "layers by ONNX node name, so names must be unique"
        )
    shapes = _layer_output_shapes(model, input_shape, [n.output[0] for n, _ in candidates], model_name)
    layers = []
    for index, (node, weight) in enumerate(candidates):
        kind = KINDS[node.op_type]
        weight_shape = tuple(int(d) for d in initializers[weight].dims)
        bias = kind.bias_input(node)
        bias_params = int(np.prod(initializers[bias].dims)) if bias in initializers else 0
        output_shape = ("batch",) + tuple(shapes[node.output[0]][1:])
        layers.append(
            Layer(
                name=node.name,
                op_type=node.op_type,
                index=index,
                weight_name=weight,
                weight_shape=weight_shape,
                output_shape=output_shape,
                macs=kind.macs(node, weight_shape, output_shape),
                params=int(np.prod(weight_shape)) + bias_params,
                output_channels=kind.output_channels(node, weight_shape),
            )
        )
    return layers


SampleShape = Sequence[int] | Callable[[], Sequence[int]]


def load_model(path: str | Path, sample_shape: SampleShape | None = None) -> LoadedModel:
    """Read an ONNX classifier and describe it; refuses models the audit cannot handle, with a reason.

    sample_shape is one input's shape without the batch dim (C, H, W): the data's, or --input-shape.
    It gives the dims the model leaves symbolic, on which layer shapes and MACs depend. It may be a
    function returning it, called only when the model has such dims (so no data is loaded for nothing).
    """
    path = Path(path)
    proto = read_model(path)
    initializer_names = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializer_names]
    if len(inputs) != 1:
        raise PtqauditError(f"{path}: expected one image input, found {len(inputs)}: {[i.name for i in inputs]}")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise PtqauditError(f"{path}: input {inputs[0].name!r} must be float32")
    input_shape = _dims(inputs[0]) or ()
    if len(proto.graph.output) != 1:
        raise PtqauditError(
            f"{path}: not a classifier: expected one output of class scores, found {len(proto.graph.output)}"
        )
    output_shape = _dims(proto.graph.output[0])
    if output_shape is not None and len(output_shape) != 2:
        raise PtqauditError(
            f"{path}: not a classifier: output {proto.graph.output[0].name!r} has shape "
            f"{list(output_shape)}, expected [batch, classes]"
        )
    num_classes = output_shape[1] if output_shape and isinstance(output_shape[1], int) else None
    layers = find_layers(proto, _fill_input_shape(input_shape, sample_shape, path), str(path))
    if not layers:
        raise PtqauditError(
            f"{path}: no quantizable layer (Conv, MatMul or Gemm with a constant weight) in the model"
        )
    return LoadedModel(path, proto, layers, inputs[0].name, input_shape, num_classes)


def _fill_input_shape(declared: tuple, sample_shape: SampleShape | None, path: Path) -> tuple:
    """The model's input shape with its symbolic non-batch dims taken from `sample_shape`."""
    if sample_shape is None or not declared:
        return declared
    if callable(sample_shape):
        if not any(is_free_dim(dim) for dim in declared[1:]):
            return declared
        sample_shape = sample_shape()
    sample = tuple(int(size) for size in sample_shape)
    if len(sample) != len(declared) - 1 or any(
        not is_free_dim(want) and want != have for want, have in zip(declared[1:], sample)
    ):
        raise PtqauditError(
            f"model {path} expects input {format_shape(declared)} but the data (or --input-shape) gives "
            f"{format_shape(['N', *sample])}"
        )
    return (declared[0], *sample)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    """The model itself when its opset is at least `minimum`, else a copy converted to opset 13."""
    if default_opset(model) >= minimum:
        return model
    try:
        return onnx.version_converter.convert_version(model, max(minimum, 13))
    except Exception as exc:
        raise PtqauditError(
            f"model uses opset {default_opset(model)}; this needs opset >= {minimum} and the automatic upgrade "
            f"failed ({str(exc).splitlines()[0]}); re-export the model with a newer opset"
        ) from exc
