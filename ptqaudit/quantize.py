"""Policy -> quantized ONNX graph on ONNX Runtime's integer kernels (quantize_dynamic where it applies)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from .arithmetic import activation_code_max, quantize_table, quantize_weight
from .errors import PtqauditError
from .layer_kinds import KINDS, kind_of
from .onnx_graph import CONTRIB_DOMAIN, Layer, LoadedModel, declare_contrib_domain, has_contrib_ops, upgrade_opset
from .policy import LayerQuant, ResolvedPolicy
from .recurrent_graph import unfused_lstm
from .runs import write_atomic

ORT_QUANTIZER = "onnxruntime.quantize_dynamic"
REWRITE = "ptqaudit-rewrite"
MIN_OPSET = 11  # DynamicQuantizeLinear, Round and Clip-with-inputs all need opset 11
UINT8_WEIGHT_OFFSET = 128  # weight_type uint8: stored code = int8 code + 128, with zero point 128
# ORT's session option (onnxruntime_session_options_config_keys.h): "1" makes x64 CPUs whose u8 x s8 kernels
# can saturate (AVX2 / AVX512 without VNNI) run constant int8 weights on the u8 x u8 kernels instead. Its
# rewrite is a level-2 graph optimisation: it needs ORT's default optimisation level (ptqaudit's sessions keep it).
X64_QUANT_PRECISION_KEY = "session.x64quantprecision"


@dataclass
class QuantizedModel:
    """A quantized graph, how it was built, and (for the rewrite) the tensors each layer computes,
    so tests can read the activation codes and int32 accumulators back from ONNX Runtime."""

    proto: onnx.ModelProto
    method: str  # ORT_QUANTIZER or REWRITE
    layer_tensors: dict[str, dict[str, str]] = field(default_factory=dict)
    # the policy asks for ORT's session option session.x64quantprecision: a session setting, not part of
    # the graph, so whoever makes the session applies it (evaluate.make_session does)
    x64_quant_precision: bool = False

    @property
    def session_config(self) -> dict[str, str]:
        """The ORT session config entries the policy needs beside the graph (a model file cannot carry them)."""
        return {X64_QUANT_PRECISION_KEY: "1"} if self.x64_quant_precision else {}

    def save(self, path: str | Path) -> None:
        """Write atomically: a failed write leaves nothing behind."""
        write_atomic(Path(path), self.proto.SerializeToString())


def ort_quantizer_applies(model: LoadedModel, policy: ResolvedPolicy) -> bool:
    """quantize_dynamic takes one weight width (8, or 7 via reduce_range), 8-bit activations and one
    granularity for the whole model; fp32 layers are its nodes_to_exclude. Its per_channel=True does
    not reach Conv (ConvInteger stays per tensor), so per-channel Conv layers need the rewrite. Its
    uint8 weights are asymmetric or on another grid (scale max|w| / 127.5), so uint8 weights of the
    int8 codes need the rewrite too."""
    if policy.options.weight_type != "int8":
        return False
    kinds = {model.layer(name).kind.selector for name in policy.quantized}
    # embedding tables: quantize_dynamic stores them at 8 bits whatever the weight width (reduce_range too)
    tables = {q.weight_bits for name, q in policy.quantized.items() if model.layer(name).kind.weight_only}
    settings = {q for name, q in policy.quantized.items() if not model.layer(name).kind.weight_only}
    if len(settings) != 1 or not tables <= {8}:
        return False
    (setting,) = settings
    if setting.per_channel and "Conv" in kinds:
        return False
    # an activation product's operand B is quantized as an activation: reduce_range (w7) does not reach it
    return setting.weight_bits in ((8,) if "attention" in kinds else (7, 8)) and setting.activation_bits == 8


def _quantize_with_ort(model: LoadedModel, policy: ResolvedPolicy) -> QuantizedModel:
    setting = next(q for name, q in policy.quantized.items() if not model.layer(name).kind.weight_only)
    targets = [model.layer(name).kind.ort_quantizer_name(name) for name in policy.quantized]
    extra_options = {}
    for name in policy.quantized:
        extra_options.update(model.layer(name).kind.ort_extra_options())
    if has_contrib_ops(model.proto):
        # ONNX's shape inference knows no contrib op, so the types of what follows one stay unknown, which
        # quantize_dynamic refuses unless told a default (they are float32 in these graphs)
        extra_options["DefaultTensorType"] = TensorProto.FLOAT
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quantized.onnx"
        logging.disable(logging.WARNING)  # its advice to pre-process the model is noise in a CLI
        try:
            quantize_dynamic(
                upgrade_opset(model.proto, MIN_OPSET),
                out,
                weight_type=QuantType.QInt8,
                per_channel=setting.per_channel,
                reduce_range=setting.weight_bits == 7,
                op_types_to_quantize=sorted({kind.op_type for kind in KINDS.values()}),
                nodes_to_quantize=targets,
                extra_options=extra_options,
            )
        finally:
            logging.disable(logging.NOTSET)
        proto = onnx.load(str(out))
    # a quantized layer is renamed (Conv -> ConvInteger, MatMul -> MatMulInteger) or reads int8 codes (Gather)
    floats = {init.name: init for init in proto.graph.initializer if init.data_type == TensorProto.FLOAT}
    left_float = {n.name for n in proto.graph.node if n.name in set(targets) and kind_of(n, floats) is not None}
    if left_float:
        raise PtqauditError(
            f"onnxruntime's quantize_dynamic left {len(left_float)} layer(s) of policy {policy.name} in float: "
            f"{', '.join(sorted(left_float))}"
        )
    return QuantizedModel(proto, ORT_QUANTIZER)


class _Rewriter:
    """Builds the integer graph node by node: one handler per op family, each returning new nodes."""

    def __init__(self, model: onnx.ModelProto, uint8_weights: bool = False):
        self.model = model
        self.uint8_weights = uint8_weights
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.new_initializers: list[TensorProto] = []
        self.activation_cache: dict[tuple[str, int], tuple[str, str, str]] = {}
        self.layer_tensors: dict[str, dict[str, str]] = {}

    def constant(self, name: str, array: np.ndarray) -> str:
        self.new_initializers.append(numpy_helper.from_array(array, name))
        return name

    def quantize_activation(self, tensor: str, bits: int) -> tuple[list[onnx.NodeProto], tuple[str, str, str]]:
        """Nodes giving (codes uint8, scale, zero point) of a tensor at b bits, shared between layers
        that read the same tensor at the same width. 8 bits is ORT's DynamicQuantizeLinear itself; fewer
        bits is its formula written in standard ops: range over the whole tensor widened to include 0,
        scale = range / (2^b - 1) (1 when the range is empty, as ORT does), round half to even."""
        key = (tensor, bits)
        if key in self.activation_cache:
            return [], self.activation_cache[key]
        stem = f"{tensor}_a{bits}"
        codes, scale, zero_point = f"{stem}_codes", f"{stem}_scale", f"{stem}_zero_point"
        self.activation_cache[key] = (codes, scale, zero_point)
        if bits == 8:
            return [helper.make_node("DynamicQuantizeLinear", [tensor], [codes, scale, zero_point], name=f"{stem}_quantize")], (codes, scale, zero_point)
        qmax = self.constant(f"{stem}_qmax", np.array(activation_code_max(bits), dtype=np.float32))
        zero = self.constant(f"{stem}_zero", np.array(0.0, dtype=np.float32))
        one = self.constant(f"{stem}_one", np.array(1.0, dtype=np.float32))
        n = f"{stem}_"
        nodes = [
            helper.make_node("ReduceMin", [tensor], [n + "min"], keepdims=0, name=n + "min"),
            helper.make_node("ReduceMax", [tensor], [n + "max"], keepdims=0, name=n + "max"),
            helper.make_node("Min", [n + "min", zero], [n + "rmin"], name=n + "rmin"),
            helper.make_node("Max", [n + "max", zero], [n + "rmax"], name=n + "rmax"),
            helper.make_node("Sub", [n + "rmax", n + "rmin"], [n + "range"], name=n + "range"),
            helper.make_node("Div", [n + "range", qmax], [n + "raw_scale"], name=n + "raw_scale"),
            helper.make_node("Equal", [n + "range", zero], [n + "empty"], name=n + "empty"),
            helper.make_node("Where", [n + "empty", one, n + "raw_scale"], [scale], name=n + "scale"),
            helper.make_node("Neg", [n + "rmin"], [n + "neg_rmin"], name=n + "neg_rmin"),
            helper.make_node("Div", [n + "neg_rmin", scale], [n + "zp_real"], name=n + "zp_real"),
            helper.make_node("Clip", [n + "zp_real", zero, qmax], [n + "zp_clipped"], name=n + "zp_clipped"),
            helper.make_node("Round", [n + "zp_clipped"], [n + "zp_float"], name=n + "zp_float"),
            helper.make_node("Cast", [n + "zp_float"], [zero_point], to=TensorProto.UINT8, name=n + "zp"),
            helper.make_node("Div", [tensor, scale], [n + "scaled"], name=n + "scaled"),
            helper.make_node("Round", [n + "scaled"], [n + "rounded"], name=n + "rounded"),
            helper.make_node("Add", [n + "rounded", n + "zp_float"], [n + "shifted"], name=n + "shifted"),
            helper.make_node("Clip", [n + "shifted", zero, qmax], [n + "clipped"], name=n + "clipped"),
            helper.make_node("Cast", [n + "clipped"], [codes], to=TensorProto.UINT8, name=n + "codes"),
        ]
        return nodes, (codes, scale, zero_point)

    def weight_only_layer(self, node: onnx.NodeProto, layer: Layer, q: LayerQuant) -> list[onnx.NodeProto]:
        """What quantize_dynamic makes of an embedding lookup: the same Gather on the table's uint8 codes (per
        tensor, asymmetric: arithmetic.table_codes), then DequantizeLinear of the rows gathered."""
        table = numpy_helper.to_array(self.initializers[layer.weight_name]).astype(np.float32)
        codes, scale, zero_point = quantize_table(table, q.weight_bits)
        stem = f"{node.name}_w{q.weight_bits}"
        codes_name = self.constant(f"{stem}_weight_codes", codes)
        scale_name = self.constant(f"{stem}_weight_scale", scale)
        zero_point = self.constant(f"{stem}_weight_zero_point", zero_point)
        gathered = f"{stem}_gathered"
        gather = onnx.NodeProto()
        gather.CopyFrom(node)
        gather.input[0], gather.output[0] = codes_name, gathered
        self.layer_tensors[node.name] = {"w_codes": codes_name, "w_scale": scale_name, "output": node.output[0]}
        return [gather, helper.make_node("DequantizeLinear", [gathered, scale_name, zero_point], [node.output[0]],
                                         name=f"{stem}_dequantize")]

    def activation_product(self, node: onnx.NodeProto, q: LayerQuant) -> list[onnx.NodeProto]:
        """What quantize_dynamic makes of a MatMul of two activations with MatMulConstBOnly off: both operands
        quantized on the fly (A at the activation width, B at the weight width), MatMulInteger on the u8 x u8
        kernel, then Cast(int32) * (a_scale * b_scale)."""
        stem = f"{node.name}_w{q.weight_bits}a{q.activation_bits}"
        nodes, (a_codes, a_scale, a_zero_point) = self.quantize_activation(node.input[0], q.activation_bits)
        b_nodes, (b_codes, b_scale, b_zero_point) = self.quantize_activation(node.input[1], q.weight_bits)
        acc, acc_float, scales = f"{stem}_acc_int32", f"{stem}_acc_float", f"{stem}_scales"
        nodes += b_nodes + [
            helper.make_node("Mul", [a_scale, b_scale], [scales], name=f"{stem}_scales"),
            helper.make_node("MatMulInteger", [a_codes, b_codes, a_zero_point, b_zero_point], [acc],
                             name=f"{stem}_matmul_integer"),
            helper.make_node("Cast", [acc], [acc_float], to=TensorProto.FLOAT, name=f"{stem}_cast"),
            helper.make_node("Mul", [acc_float, scales], [node.output[0]], name=f"{stem}_rescale"),
        ]
        self.layer_tensors[node.name] = {"x_codes": a_codes, "x_scale": a_scale, "x_zero_point": a_zero_point,
                                         "w_codes": b_codes, "w_scale": b_scale, "acc": acc, "output": node.output[0]}
        return nodes

    def lstm_weights(self, node: onnx.NodeProto, q: LayerQuant, index: int) -> tuple[np.ndarray, ...]:
        """An LSTM's W (index 1) or R (index 2) as DynamicQuantizeLSTM takes it: codes transposed to [D, K, 4H],
        scales per direction [D] or per gate unit [D, 4H] (onnxruntime.quantization's layout), zero points of
        the same shape."""
        stored = numpy_helper.to_array(self.initializers[node.input[index]]).astype(np.float32)  # [D, 4H, K]
        per_direction = [quantize_weight(w, q.weight_bits, 0 if q.per_channel else None) for w in stored]
        codes = np.stack([c.T for c, _ in per_direction])
        scales = np.stack([s for _, s in per_direction]).astype(np.float32)
        zero_points = np.zeros(scales.shape, dtype=np.int8)
        if self.uint8_weights:
            codes = (codes.astype(np.int16) + UINT8_WEIGHT_OFFSET).astype(np.uint8)
            zero_points = np.full(scales.shape, UINT8_WEIGHT_OFFSET, dtype=np.uint8)
        return codes, scales, zero_points

    def lstm_layer(self, node: onnx.NodeProto, layer: Layer, q: LayerQuant) -> list[onnx.NodeProto]:
        """An LSTM at 8-bit activations is ORT's DynamicQuantizeLSTM fed the b-bit weight codes (exactly what
        quantize_dynamic makes of it at 8 bits); below 8 bits, where that kernel cannot go, unfused_lstm_layer."""
        if q.activation_bits != 8:
            return self.unfused_lstm_layer(node, q)
        stem = f"{node.name}_w{q.weight_bits}a{q.activation_bits}"
        names = {part: [self.constant(f"{stem}_{part}_{what}", array)
                        for what, array in zip(("codes", "scale", "zero_point"), self.lstm_weights(node, q, index))]
                 for part, index in (("weight", 1), ("recurrence", 2))}
        (w_codes, w_scale, w_zero_point), (r_codes, r_scale, r_zero_point) = names["weight"], names["recurrence"]
        self.layer_tensors[node.name] = {"w_codes": w_codes, "w_scale": w_scale, "output": node.output[0]}
        inputs = list(node.input[:8]) + [""] * (8 - len(node.input))
        inputs[1:3] = [w_codes, r_codes]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return [helper.make_node("DynamicQuantizeLSTM", inputs + [w_scale, w_zero_point, r_scale, r_zero_point],
                                 list(node.output), name=f"{stem}_quantized", domain=CONTRIB_DOMAIN, **attrs)]

    def unfused_lstm_layer(self, node: onnx.NodeProto, q: LayerQuant) -> list[onnx.NodeProto]:
        """The same arithmetic unfused (recurrent_graph.py): X quantized once, MatMulInteger by W, and a Scan
        whose step quantizes h and multiplies by R; each direction's codes [K, 4H], scale and zero point."""
        stem = f"{node.name}_w{q.weight_bits}a{q.activation_bits}"
        parts = {}
        for part, index in (("weight", 1), ("recurrence", 2)):
            codes, scales, zero_points = self.lstm_weights(node, q, index)
            parts[part] = [(self.constant(f"{stem}_{part}_codes_{d}", codes[d]),
                            self.constant(f"{stem}_{part}_scale_{d}", scales[d]),
                            self.constant(f"{stem}_{part}_zero_point_{d}", np.array(zero_points[d].flat[0])))
                           for d in range(len(codes))]
        w_codes, w_scale, _ = parts["weight"][0]  # the first direction's, for tests reading them back
        self.layer_tensors[node.name] = {"w_codes": w_codes, "w_scale": w_scale, "output": node.output[0]}
        return unfused_lstm(self, node, q, stem, parts["weight"], parts["recurrence"])

    def fused_attention_layer(self, node: onnx.NodeProto, layer: Layer, q: LayerQuant) -> list[onnx.NodeProto]:
        """What quantize_dynamic makes of the optimizer's Attention, at b bits: QAttention fed the input's b-bit
        codes (with their scale and zero point) and the projection weight's b-bit codes, per tensor or per column.
        QAttention multiplies the codes it is given, so this is exact at every width."""
        weight = numpy_helper.to_array(self.initializers[layer.weight_name]).astype(np.float32)  # [K, 3H]
        w_codes, w_scale = quantize_weight(weight, q.weight_bits, layer.kind.scale_axis(q.per_channel))
        w_zero_point = np.zeros(w_scale.shape, dtype=np.int8)
        if self.uint8_weights:
            w_codes = (w_codes.astype(np.int16) + UINT8_WEIGHT_OFFSET).astype(np.uint8)
            w_zero_point = np.full(w_scale.shape, UINT8_WEIGHT_OFFSET, dtype=np.uint8)
        stem = f"{node.name}_w{q.weight_bits}a{q.activation_bits}"
        nodes, (x_codes, x_scale, x_zero_point) = self.quantize_activation(node.input[0], q.activation_bits)
        bias = layer.kind.bias_input(node) or self.constant(f"{stem}_bias", np.zeros(weight.shape[1], np.float32))
        mask_index, past = layer.kind.runtime_inputs(node)
        names = [self.constant(f"{stem}_weight_codes", w_codes), self.constant(f"{stem}_weight_scale", w_scale),
                 self.constant(f"{stem}_weight_zero_point", w_zero_point)]
        inputs = [x_codes, names[0], bias, x_scale, names[1], mask_index, x_zero_point, names[2], past]
        while not inputs[-1]:
            inputs.pop()
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.layer_tensors[node.name] = {"x_codes": x_codes, "x_scale": x_scale, "x_zero_point": x_zero_point,
                                         "w_codes": names[0], "w_scale": names[1], "output": node.output[0]}
        return nodes + [helper.make_node("QAttention", inputs, list(node.output), name=f"{stem}_quantized",
                                         domain=CONTRIB_DOMAIN, **attrs)]

    def fused_embedding_layer(self, node: onnx.NodeProto, layer: Layer, q: LayerQuant) -> list[onnx.NodeProto]:
        """What quantize_dynamic makes of the optimizer's EmbedLayerNormalization: QEmbedLayerNormalization on the
        tables, gamma and beta as asymmetric b-bit codes per tensor (arithmetic.table_codes), each with its scale
        and zero point; it dequantizes them as it reads, so b-bit codes are an exact equivalent."""
        stem = f"{node.name}_w{q.weight_bits}"
        codes, scales, zero_points = [], [], []
        for index in layer.kind.TABLES:
            name = node.input[index] if index < len(node.input) else ""
            if not name:  # no segment table: its three inputs stay empty
                codes.append("")
                scales.append("")
                zero_points.append("")
                continue
            table = numpy_helper.to_array(self.initializers[name]).astype(np.float32)
            table_codes, scale, zero_point = quantize_table(table, q.weight_bits)
            codes.append(self.constant(f"{stem}_{index}_codes", table_codes))
            scales.append(self.constant(f"{stem}_{index}_scale", scale))
            zero_points.append(self.constant(f"{stem}_{index}_zero_point", zero_point))
        mask = node.input[7] if len(node.input) > 7 else ""
        inputs = [node.input[0], node.input[1], *codes, mask, *scales, *zero_points]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.layer_tensors[node.name] = {"w_codes": codes[0], "w_scale": scales[0], "output": node.output[0]}
        return [helper.make_node("QEmbedLayerNormalization", inputs, list(node.output), name=f"{stem}_quantized",
                                 domain=CONTRIB_DOMAIN, **attrs)]

    def integer_layer(self, node: onnx.NodeProto, layer: Layer, q: LayerQuant) -> list[onnx.NodeProto]:
        """The layer kind's integer op (ConvInteger, MatMulInteger) followed by ORT's float epilogue:
        Cast(int32 accumulator) * (x_scale * w_scale) + bias."""
        kind = layer.kind
        # ORT's Gemm rewrite also multiplies by the transposed weight
        stored = numpy_helper.to_array(self.initializers[layer.weight_name]).astype(np.float32)
        weight = kind.engine_weight(node, stored)
        w_codes, w_scale = quantize_weight(weight, q.weight_bits, kind.scale_axis(q.per_channel))
        w_zero_point = np.array(0, dtype=np.int8)
        if self.uint8_weights:
            # the same codes shifted into uint8, so ORT runs its exact u8 x u8 kernels; one scalar zero
            # point serves per-channel layers too (ConvInteger accepts no other)
            w_codes = (w_codes.astype(np.int16) + UINT8_WEIGHT_OFFSET).astype(np.uint8)
            w_zero_point = np.array(UINT8_WEIGHT_OFFSET, dtype=np.uint8)
        if q.per_channel:
            w_scale = kind.along_output_channels(w_scale, weight.ndim)
        stem = f"{node.name}_w{q.weight_bits}a{q.activation_bits}"
        nodes, (x_codes, x_scale, x_zero_point) = self.quantize_activation(node.input[0], q.activation_bits)
        w_name = self.constant(f"{stem}_weight_codes", w_codes)
        w_scale_name = self.constant(f"{stem}_weight_scale", w_scale)
        w_zero_point = self.constant(f"{stem}_weight_zero_point", w_zero_point)
        acc, acc_float, scales = f"{stem}_acc_int32", f"{stem}_acc_float", f"{stem}_scales"
        output = node.output[0]
        bias = kind.bias_input(node)
        product = f"{stem}_product" if bias else output
        nodes += [
            helper.make_node("Mul", [x_scale, w_scale_name], [scales], name=f"{stem}_scales"),
            kind.integer_node(node, [x_codes, w_name, x_zero_point, w_zero_point], acc, stem),
            helper.make_node("Cast", [acc], [acc_float], to=TensorProto.FLOAT, name=f"{stem}_cast"),
            helper.make_node("Mul", [acc_float, scales], [product], name=f"{stem}_rescale"),
        ]
        if bias:
            if kind.channels_first:
                bias_array = numpy_helper.to_array(self.initializers[bias]).astype(np.float32)
                bias = self.constant(f"{stem}_bias", kind.along_output_channels(bias_array, weight.ndim))
            nodes.append(helper.make_node("Add", [product, bias], [output], name=f"{stem}_bias_add"))
        self.layer_tensors[node.name] = {
            "x_codes": x_codes, "x_scale": x_scale, "x_zero_point": x_zero_point,
            "w_codes": w_name, "w_scale": w_scale_name, "acc": acc, "output": output,
        }
        return nodes

    def run(self, model: LoadedModel, policy: ResolvedPolicy) -> QuantizedModel:
        graph = self.model.graph
        layers = {layer.name: layer for layer in model.layers}
        new_nodes = []
        for node in graph.node:
            q = policy.mapping.get(node.name)
            layer = layers.get(node.name)
            if q is None:
                new_nodes.append(node)
            elif layer.kind.op_type in ("LSTM", "Attention", "EmbedLayerNormalization"):  # ORT's quantized forms
                handler = {"LSTM": self.lstm_layer, "Attention": self.fused_attention_layer,
                           "EmbedLayerNormalization": self.fused_embedding_layer}[layer.kind.op_type]
                new_nodes += handler(node, layer, q)
            elif layer.kind.weight_only:
                new_nodes += self.weight_only_layer(node, layer, q)
            elif not layer.weight_name:  # a product of two activations: operand B is quantized as one too
                new_nodes += self.activation_product(node, q)
            else:
                new_nodes += self.integer_layer(node, layer, q)
        used = _inputs_read(new_nodes)
        kept = [init for init in graph.initializer if init.name in used]
        dropped = {init.name for init in graph.initializer} - used
        # old exporters also list initializers as graph inputs; a dropped float weight must go from both
        inputs = [i for i in graph.input if i.name not in dropped]
        new_graph = helper.make_graph(
            new_nodes, graph.name, inputs, list(graph.output),
            kept + [i for i in self.new_initializers if i.name in used],
            value_info=[],
        )
        proto = declare_contrib_domain(helper.make_model(new_graph, opset_imports=list(self.model.opset_import),
                                                         ir_version=self.model.ir_version))
        proto.producer_name = "ptqaudit"
        onnx.checker.check_model(proto)
        # inferred shapes in the graph, as quantize_dynamic leaves them: some of ORT's fusions need them (an Add
        # and a LayerNormalization become SkipLayerNormalization only with known shapes), and the arithmetic of
        # the fused kernel differs by ulps
        try:
            proto = onnx.shape_inference.infer_shapes(proto)
        except Exception:  # a graph ONNX cannot infer still runs, unfused
            pass
        return QuantizedModel(proto, REWRITE, self.layer_tensors)


def _inputs_read(nodes) -> set[str]:
    """Every tensor name the nodes read, in their subgraphs (a Scan's step) too."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names |= _inputs_read(attribute.g.node)
    return names


def quantize(model: LoadedModel, policy: ResolvedPolicy, force_rewrite: bool = False) -> QuantizedModel:
    """The graph ONNX Runtime runs for `policy`: quantize_dynamic itself where it can express the
    policy (unless force_rewrite, used to cross-check the two paths), else the integer rewrite; with
    the session option the policy asks for, if any."""
    if not policy.quantized:
        return QuantizedModel(model.proto, "fp32")
    if ort_quantizer_applies(model, policy) and not force_rewrite:
        quantized = _quantize_with_ort(model, policy)
    else:
        source = upgrade_opset(model.proto, MIN_OPSET)
        quantized = _Rewriter(source, policy.options.weight_type == "uint8").run(model, policy)
    quantized.x64_quant_precision = policy.options.x64_quant_precision
    return quantized
