"""Loading an ONNX classifier safely and finding its quantizable layers, their shapes and MACs."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .data import format_dim, format_shape, is_free_dim
from .errors import PtqauditError
from .layer_kinds import KINDS, LayerKind, kind_of


@dataclass(frozen=True)
class Layer:
    """One quantizable node: a Conv, MatMul or Gemm whose weight is a constant initializer, an embedding lookup,
    or a MatMul of two activations (layer_kinds.py)."""

    name: str
    op_type: str
    index: int  # position among the model's quantizable layers, in graph order
    weight_name: str
    weight_shape: tuple[int, ...]
    output_shape: tuple[int | str, ...]  # per inferred shapes; the batch dim stays symbolic
    macs: int  # multiply-accumulates for one input sample
    params: int  # weight and bias elements
    output_channels: int  # what a per-channel weight scale runs along: Conv filters, MatMul/Gemm columns (N)
    kind_name: str = ""  # the kind's selector (layer_kinds.KINDS); "" for the kind named by op_type

    @property
    def kind(self) -> LayerKind:
        return KINDS[self.kind_name or self.op_type]


# ops onnxruntime's quantize_dynamic quantizes by default (its IntegerOpsRegistry): one that is no layer here
# (weights computed at run time, or a variant its quantizer or ptqaudit leaves in float) is named in a note
UNAUDITED_OPS = ("LSTM", "Attention", "EmbedLayerNormalization")
TEXT_INPUT_TYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}


@dataclass(frozen=True)
class TokenLimits:
    """What a text model's embedding tables accept: for each input of token ids, the table's rows (ids run
    0..rows-1) and name; and the rows of its position table, the longest sequence it takes (None: no table)."""

    vocabulary: dict[str, tuple[int, str]]
    positions: tuple[int, str] | None


@dataclass
class LoadedModel:
    path: Path
    proto: onnx.ModelProto
    layers: list[Layer]
    input_names: list[str]  # one float32 image input, or the integer inputs of a text model, in graph order
    input_shape: tuple[int | str | None, ...]  # every input's shape (a text model's inputs share [batch, sequence])
    num_classes: int | None  # None where the output width is only known at run time
    input_dtypes: list[type] = field(default_factory=lambda: [np.float32])
    token_limits: TokenLimits | None = None  # text models only
    counted_shape: tuple = ()  # the input shape layer shapes and MACs are counted at (symbolic dims filled)
    unaudited: list[str] = field(default_factory=list)  # nodes quantize_dynamic quantizes that ptqaudit leaves in float

    @property
    def unaudited_note(self) -> str:
        """One line naming the nodes of a kind quantize_dynamic quantizes that stay float here ("" when none)."""
        if not self.unaudited:
            return ""
        return (f"note: {len(self.unaudited)} node(s) of a kind quantize_dynamic quantizes stay in float here (their "
                f"weights are not constants, or a variant ptqaudit does not quantize): "
                f"{', '.join(self.unaudited[:6])}{' ...' if len(self.unaudited) > 6 else ''}")

    @property
    def sequence_length(self) -> int | str | None:
        """A text model's sequence length its MACs are counted at."""
        return self.counted_shape[1] if self.is_text and len(self.counted_shape) > 1 else None

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    @property
    def input_name(self) -> str:
        """The image input (the first input of a text model)."""
        return self.input_names[0]

    @property
    def is_text(self) -> bool:
        return self.token_limits is not None

    @property
    def inputs(self) -> list[tuple[str, type]]:
        """(name, NumPy dtype) of each input, as ORT is fed them."""
        return list(zip(self.input_names, self.input_dtypes))

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


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs fed at run time (old exporters also list initializers as inputs)."""
    initializer_names = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializer_names]


def _with_input_shape(model: onnx.ModelProto, shape: Sequence) -> onnx.ModelProto:
    """A copy of the model whose inputs declare `shape` (where `shape` gives a number)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for graph_input in _graph_inputs(fixed):
        for dim, size in zip(graph_input.type.tensor_type.shape.dim, shape):
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
    inference leaves a non-batch dimension unknown (Slice/Reshape chains often defeat it); the batch dim is
    symbolic, or 1 from ORT's run (a layer kind knows where it is: LayerKind.sample_output_shape).
    `input_shape` may fix dims the model leaves symbolic (from the data or --input-shape)."""
    inputs = _graph_inputs(model)
    sized = model if all(tuple(input_shape) == (_dims(i) or ()) for i in inputs) else _with_input_shape(model, input_shape)
    try:
        inferred = onnx.shape_inference.infer_shapes(sized, data_prop=True)
        shapes = {vi.name: _dims(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    except Exception:
        shapes = {}
    wanted = {n: shapes.get(n) for n in names}
    batch = input_shape[0] if input_shape else None
    if all(s is not None and sum(not isinstance(d, int) for d in s) <= (1 if batch in s else 0)
           for s in wanted.values()):
        return wanted
    symbolic = [format_dim(d) for d in input_shape[1:] if is_free_dim(d)]
    if symbolic and all(i.type.tensor_type.elem_type in TEXT_INPUT_TYPES for i in inputs):
        raise PtqauditError(
            f"model input {inputs[0].name!r} is {format_shape(input_shape)}: a text model's layer shapes and MACs "
            "depend on the sequence length; give the length to count them at, e.g. --input-shape 128 (eval, "
            "search, distill and report take it from the data)"
        )
    if symbolic:
        example = ",".join(format_dim(d) for d in input_shape[1:])
        raise PtqauditError(
            f"model input {inputs[0].name!r} is {format_shape(input_shape)} with symbolic "
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
    # zeros of each input's type: black images, or token id 0 (padding) everywhere
    feed = {i.name: np.zeros(sample_shape, dtype=TEXT_INPUT_TYPES.get(i.type.tensor_type.elem_type, np.float32))
            for i in inputs}
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs = session.run(names, feed)
    except ort_errors() as exc:
        raise ort_failure(exc, model_name, "finding its layers' shapes") from exc
    return {n: tuple(int(d) for d in out.shape) for n, out in zip(names, outputs)}


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
        kind = kind_of(node, initializers)
        if kind is not None:
            candidates.append((node, kind))
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
    # an activation product's second operand plays the weight's part in shapes and MACs
    operands = [name for n, kind in candidates if kind.weight_input(n, initializers) is None for name in n.input]
    wanted = list(dict.fromkeys([n.output[0] for n, _ in candidates] + operands))
    shapes = _layer_output_shapes(model, input_shape, wanted, model_name)
    # a product of activations is a layer when batched (attention's [batch, heads, L, d]), not when it mixes
    # the batch's inputs (a Gram matrix x^T x)
    candidates = [(n, kind) for n, kind in candidates if kind.weight_input(n, initializers) is not None
                  or all(len(shapes[name]) >= 3 for name in n.input)]
    layers = []
    for index, (node, kind) in enumerate(candidates):
        weight = kind.weight_input(node, initializers) or ""
        weight_shape = (tuple(int(d) for d in initializers[weight].dims) if weight
                        else tuple(int(d) for d in shapes[node.input[1]][1:]))
        output_shape = kind.sample_output_shape(node, tuple(shapes[node.output[0]]))
        layers.append(
            Layer(
                name=node.name,
                op_type=node.op_type,
                index=index,
                weight_name=weight,
                weight_shape=weight_shape,
                output_shape=output_shape,
                macs=kind.macs(node, weight_shape, output_shape),
                params=sum(int(np.prod(initializers[name].dims)) for name in kind.parameter_inputs(node, initializers)),
                output_channels=kind.output_channels(node, weight_shape),
                kind_name=kind.selector,
            )
        )
    return layers


SampleShape = Sequence[int] | Callable[[], Sequence[int]]


def transformer_types() -> list[str]:
    """The model types ONNX Runtime's transformer optimizer fuses (--optimize's choices)."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    return sorted(MODEL_TYPES)


def optimize_transformer(proto: onnx.ModelProto, model_type: str, path: Path) -> onnx.ModelProto:
    """The model as ONNX Runtime's transformer optimizer (onnxruntime.transformers.optimizer) fuses it for
    `model_type`, as ORT's documentation advises before quantizing: attention, embeddings + layer norm, skip
    layer norms and Gelus become its com.microsoft ops; heads and hidden size are read from the graph. Its
    Python fusions only (opt_level 0), so the result does not depend on this machine."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    types = transformer_types()
    if model_type not in types:
        raise PtqauditError(f"--optimize: unknown model type {model_type[:40]!r}; expected one of {', '.join(types)}")
    logging.disable(logging.WARNING)  # its progress and fusion warnings are noise in a CLI
    try:
        # it rewrites the proto in place: load_model keeps only the fused graph, so no copy is needed
        optimized = optimize_model(proto, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
    except Exception as exc:
        raise PtqauditError(f"onnxruntime's transformer optimizer failed on {path} (--optimize {model_type}): "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    finally:
        logging.disable(logging.NOTSET)
    # its Python fusions leave the contrib ops' domain undeclared, which ONNX's own tools (and so quantize_dynamic) refuse
    return declare_contrib_domain(optimized.model)


CONTRIB_DOMAIN = "com.microsoft"  # ONNX Runtime's own ops: fused transformer ops and their quantized forms


def has_contrib_ops(model: onnx.ModelProto) -> bool:
    return any(node.domain == CONTRIB_DOMAIN for node in model.graph.node)


def declare_contrib_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with ONNX Runtime's contrib domain among its opset imports when a node uses it (in place)."""
    if has_contrib_ops(model) and not any(opset.domain == CONTRIB_DOMAIN for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return model


def load_model(path: str | Path, sample_shape: SampleShape | None = None, optimize: str = "") -> LoadedModel:
    """Read an ONNX classifier and describe it; refuses models the audit cannot handle, with a reason.

    An image classifier takes one float32 input; a text classifier takes integer token inputs (int64 or
    int32, [batch, sequence]: input_ids, and attention_mask or token_type_ids as it was exported with).
    sample_shape is one input's shape without the batch dim: (C, H, W), or (sequence length,) for text; the
    data's, or --input-shape. It gives the dims the model leaves symbolic, on which layer shapes and MACs
    depend. It may be a function returning it, called only when the model has such dims (so no data is
    loaded for nothing). optimize: a transformer model type (transformer_types()) to fuse the model for with
    ONNX Runtime's transformer optimizer first ("" audits the model as given).
    """
    path = Path(path)
    proto = read_model(path)
    if optimize:
        proto = optimize_transformer(proto, optimize, path)
    inputs = _graph_inputs(proto)
    types = [i.type.tensor_type.elem_type for i in inputs]
    text = bool(inputs) and all(t in TEXT_INPUT_TYPES for t in types)
    if not text and (len(inputs) != 1 or types[0] != onnx.TensorProto.FLOAT):
        described = ", ".join(f"{i.name} ({onnx.TensorProto.DataType.Name(t).lower()})" for i, t in zip(inputs, types))
        raise PtqauditError(
            f"{path}: expected one float32 image input, or integer (int64/int32) token inputs of a text model; "
            f"found {len(inputs)}: {described}"
        )
    shapes = {i.name: _dims(i) or () for i in inputs}
    if text and any(len(shape) != 2 for shape in shapes.values()):
        raise PtqauditError(f"{path}: a text model's inputs are [batch, sequence]; found "
                            f"{', '.join(f'{name} {format_shape(shape)}' for name, shape in shapes.items())}")
    input_shape = shapes[inputs[0].name]
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
    counted_shape = _fill_input_shape(input_shape, sample_shape, path)
    layers = find_layers(proto, counted_shape, str(path))
    if not layers:
        raise PtqauditError(
            f"{path}: no quantizable layer (Conv, MatMul or Gemm with a constant weight) in the model"
        )
    dtypes = [TEXT_INPUT_TYPES.get(t, np.float32) for t in types]
    limits = token_limits(proto) if text else None
    layer_names = {layer.name for layer in layers}
    unaudited = [f"{n.op_type} {n.name or '(unnamed)'}" for n in proto.graph.node
                 if n.op_type in UNAUDITED_OPS and n.name not in layer_names]
    return LoadedModel(path, proto, layers, [i.name for i in inputs], input_shape, num_classes, dtypes, limits,
                       counted_shape, unaudited)


def token_limits(model: onnx.ModelProto) -> TokenLimits:
    """The embedding tables of a text model and what they bound. A Gather on a constant table whose indices
    depend on the values of one input is that input's vocabulary; one whose indices depend on no input's
    values, only on shapes (positions 0..L-1), is the position table. Dependencies are traced through the
    graph; Shape and Size outputs depend on their input's shape, not its values."""
    initializers = {init.name: init for init in model.graph.initializer}
    depends: dict[str, frozenset[str]] = {i.name: frozenset([i.name]) for i in _graph_inputs(model)}
    vocabulary: dict[str, tuple[int, str]] = {}
    positions: tuple[int, str] | None = None
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size"):
            sources = frozenset()
        else:
            sources = frozenset().union(*(depends.get(name, frozenset()) for name in node.input))
        for output in node.output:
            depends[output] = sources
        if node.op_type == "Gather" and KINDS["embedding"].weight_input(node, initializers) is not None:
            lookups = [(node.input[1], node.input[0])]
        elif node.op_type == "EmbedLayerNormalization" and KINDS["fused-embedding"].weight_input(node, initializers):
            # word and segment tables looked up by inputs 0 and 1, the position table by 0..L-1
            lookups = [(node.input[i], node.input[t]) for i, t in ((0, 2), (1, 4)) if t < len(node.input)
                       and node.input[i] and node.input[t] in initializers]
            rows = int(initializers[node.input[3]].dims[0])
            positions = min(positions or (rows, node.input[3]), (rows, node.input[3]))
        else:
            continue
        for indices, table in lookups:
            rows = int(initializers[table].dims[0])
            index_sources = depends.get(indices, frozenset())
            if len(index_sources) == 1:
                (source,) = index_sources
                vocabulary[source] = min(vocabulary.get(source, (rows, table)), (rows, table))
            elif not index_sources:
                positions = min(positions or (rows, table), (rows, table))
    return TokenLimits(vocabulary, positions)


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
