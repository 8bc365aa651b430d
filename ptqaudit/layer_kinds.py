"""Layer kinds: for each quantizable ONNX op type, what quantizing one of its nodes means to every engine.

A kind owns which input is the constant weight and when a node qualifies, the weight's orientation in
the engines, the bias input, the output-channel axis, the MACs, the integer node of the ONNX rewrite
and the float product the simulator runs. KINDS holds the kinds by selector name; kind_of finds a node's kind
from its op type and inputs (as onnxruntime.quantization's registry does by op type): a new layer kind is
one class here and one entry in KINDS.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from .sim.ops import conv_forward


def node_attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


class LayerKind:
    """A node multiplying its first input by a constant weight, optionally adding a bias (input 2)."""

    op_type = ""
    selector = ""  # the policy selector naming every layer of the kind: @<selector>
    also_selected_by: tuple[str, ...] = ()  # other kinds' selectors that reach it too (a fused form of that kind)
    weight_only = False  # only the weight is quantized: no activation range, no integer product
    quantized_by_default = True  # a policy's default setting applies (else only rules that select it do)
    output_axis = 1  # axis of the weight, as the engines hold it, that indexes output channels
    channels_first = False  # output channels on axis 1 of the output (else the last axis, where vectors broadcast)
    matrix_kernel = True  # ORT runs it on the u8 x s8 matrix kernel, whose arithmetic depends on the CPU (kernels.py)

    def weight_input(self, node: onnx.NodeProto, initializers: dict) -> str | None:
        """Name of the constant weight the node multiplies by, or None when the node does not qualify."""
        return node.input[1] if node.input[1] in initializers else None

    def qualifies(self, node: onnx.NodeProto, initializers: dict) -> bool:
        """Whether the node (of this kind's op type) is a layer of this kind."""
        return self.weight_input(node, initializers) is not None

    def activation_input(self, node: onnx.NodeProto) -> str:
        """The input the layer takes at run time (the one dynamic quantization measures, when it does)."""
        return node.input[0]

    def bias_input(self, node: onnx.NodeProto) -> str | None:
        return node.input[2] if len(node.input) > 2 and node.input[2] != "" else None

    def parameter_inputs(self, node: onnx.NodeProto, initializers: dict) -> list[str]:
        """The node's constant inputs that are the layer's parameters: its weight and bias."""
        return [name for name in (self.weight_input(node, initializers), self.bias_input(node)) if name in initializers]

    def sample_output_shape(self, node: onnx.NodeProto, shape: tuple) -> tuple:
        """The output's inferred shape with its batch dim named "batch"."""
        return ("batch",) + tuple(shape[1:])

    def transposed(self, node: onnx.NodeProto) -> bool:
        """Whether the stored weight is the transpose of what the engines multiply by."""
        return False

    def engine_weight(self, node: onnx.NodeProto, weight):
        """The stored weight as the engines multiply by it; applied again, it gives back the stored layout."""
        return weight.T if self.transposed(node) else weight

    def engine_shape(self, node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        return weight_shape[::-1] if self.transposed(node) else weight_shape

    def output_channels(self, node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> int:
        return self.engine_shape(node, weight_shape)[self.output_axis]

    def scale_axis(self, per_channel: bool) -> int | None:
        """The engine weight's axis with one scale per slice, or None for one scale per tensor."""
        return self.output_axis if per_channel else None

    def macs(self, node: onnx.NodeProto, weight_shape: tuple[int, ...], output_shape: tuple) -> int:
        """Multiply-accumulates per sample: every output element takes K products (engine weight [K, N])."""
        return _per_sample(output_shape) * self.engine_shape(node, weight_shape)[0]

    def along_output_channels(self, vector, output_rank: int):
        """A per-output-channel vector shaped to broadcast against the layer's output."""
        return vector.reshape(-1, *([1] * (output_rank - 2))) if self.channels_first else vector

    def ort_extra_options(self) -> dict:
        """quantize_dynamic's extra_options needed to quantize layers of this kind."""
        return {}

    def ort_quantizer_name(self, name: str) -> str:
        """The name by which onnxruntime's quantize_dynamic selects the layer named `name`."""
        return name

    def integer_node(self, node: onnx.NodeProto, inputs: list[str], output: str, name: str) -> onnx.NodeProto:
        """The rewrite's integer op: (x codes, weight codes, x zero point, weight zero point) -> int32."""
        return helper.make_node("MatMulInteger", inputs, [output], name=f"{name}_matmul_integer")

    def float_product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      attrs: dict) -> torch.Tensor:
        """The simulator's product with the engine weight (float, or integer codes held in floats)."""
        y = torch.matmul(x, weight)
        return y if bias is None else y + bias


class ConvKind(LayerKind):
    op_type = selector = "Conv"
    output_axis = 0  # weight [Cout, Cin / group, *kernel]
    channels_first = True
    matrix_kernel = False  # ConvInteger (im2col, then a u8 x u8 GEMM) is exact on every CPU

    def macs(self, node, weight_shape, output_shape):
        # every output element takes (Cin / group) * kernel products
        return _per_sample(output_shape) * int(np.prod(weight_shape[1:]))

    def integer_node(self, node, inputs, output, name):
        conv_attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return helper.make_node("ConvInteger", inputs, [output], name=f"{name}_conv_integer", **conv_attrs)

    def float_product(self, x, weight, bias, attrs):
        return conv_forward(x, weight, bias, attrs)


class MatMulKind(LayerKind):
    op_type = selector = "MatMul"

    def weight_input(self, node, initializers):
        weight = super().weight_input(node, initializers)
        return weight if weight is not None and len(initializers[weight].dims) == 2 else None


class GemmKind(LayerKind):
    """Y = A B + C with a constant B, [K, N], or [N, K] under transB=1 (as PyTorch exports Linear)."""

    op_type = selector = "Gemm"

    def weight_input(self, node, initializers):
        # the integer rewrite multiplies A by a constant B; transA, alpha and beta other than 1 change that
        plain = (node_attribute(node, "transA", 0) == 0 and node_attribute(node, "alpha", 1.0) == 1.0
                 and node_attribute(node, "beta", 1.0) == 1.0)
        return super().weight_input(node, initializers) if plain else None

    def transposed(self, node):
        return bool(node_attribute(node, "transB", 0))

    def ort_quantizer_name(self, name):
        # quantize_dynamic first turns each Gemm into a MatMul named "<gemm>_MatMul" plus an Add, and
        # selects nodes by that new name: the Gemm's own name would silently leave it in float
        return f"{name}_MatMul"


class EmbeddingKind(LayerKind):
    """A Gather looking rows up in a constant table (token, position and segment embeddings): ORT's dynamic
    quantization stores the table as asymmetric uint8 codes per tensor, whatever the weight type asked for
    (arithmetic.table_codes), and dequantizes the rows gathered (Gather -> DequantizeLinear). Only the table
    is quantized and nothing is multiplied, so it has no activation width and no MACs: its cost in BitOPs
    is zero."""

    op_type = "Gather"
    selector = "embedding"
    weight_only = True
    matrix_kernel = False

    def weight_input(self, node, initializers):
        table = node.input[0]
        if table not in initializers or len(initializers[table].dims) != 2 or node_attribute(node, "axis", 0) != 0:
            return None
        return table

    def activation_input(self, node):
        return node.input[1]

    def bias_input(self, node):
        return None

    def output_channels(self, node, weight_shape):
        return 1  # one scale per table

    def scale_axis(self, per_channel):
        return None

    def macs(self, node, weight_shape, output_shape):
        return 0

    def float_product(self, x, weight, bias, attrs):
        """Rows of the (dequantized) table, differentiable in the table."""
        return torch.nn.functional.embedding(x, weight)


class ActivationMatMulKind(LayerKind):
    """A MatMul of two activations: a transformer's attention scores (Q K^T) and context (P V). quantize_dynamic
    leaves it in float unless its MatMulConstBOnly option is off; then both operands are quantized on the fly
    (uint8, asymmetric, range over the tensor) and multiplied on the u8 x u8 kernel, exact on every CPU. A
    policy's default does not reach it, as quantize_dynamic's default does not; a rule selecting it does, its
    weight width then being operand B's."""

    op_type = "MatMul"
    selector = "attention"
    quantized_by_default = False
    matrix_kernel = False  # u8 x u8: exact on every CPU

    def weight_input(self, node, initializers):
        return None

    def qualifies(self, node, initializers):
        return len(node.input) == 2 and not any(name in initializers for name in node.input)

    def bias_input(self, node):
        return None

    def output_channels(self, node, weight_shape):
        return 1

    def scale_axis(self, per_channel):
        return None

    def macs(self, node, weight_shape, output_shape):
        """weight_shape is operand B's shape without the batch: each output element takes K = B's rows products."""
        return _per_sample(output_shape) * weight_shape[-2]

    def ort_extra_options(self) -> dict:
        return {"MatMulConstBOnly": False}


class LSTMKind(LayerKind):
    """An ONNX LSTM with constant W [D, 4H, K] and R [D, 4H, H]: quantize_dynamic makes it DynamicQuantizeLSTM,
    whose kernel quantizes X (one range over all steps and the batch) and, at each step, the previous hidden
    state, and multiplies both on the u8 x s8 kernel (so it saturates on avx2-u8s8). A policy's weight width
    is W's and R's, its activation width X's and h's. Weights are scaled per direction, or per gate unit (the
    4H axis) when per-channel, as onnxruntime.quantization does."""

    op_type = "LSTM"
    selector = "lstm"

    def weight_input(self, node, initializers):
        weights = node.input[1:3]
        if len(weights) < 2 or any(w not in initializers or len(initializers[w].dims) != 3 for w in weights):
            return None
        # DynamicQuantizeLSTM has no batch-first layout (quantize_dynamic drops the attribute, breaking such a node)
        return None if node_attribute(node, "layout", 0) else node.input[1]

    def recurrent_input(self, node: onnx.NodeProto) -> str:
        return node.input[2]

    def bias_input(self, node):
        return node.input[3] if len(node.input) > 3 and node.input[3] != "" else None

    def parameter_inputs(self, node, initializers):
        return [name for name in node.input[1:4] if name in initializers]

    def sample_output_shape(self, node, shape):
        # Y is [seq, directions, batch, hidden]
        return tuple(shape[:2]) + ("batch",) + tuple(shape[3:])

    def output_channels(self, node, weight_shape):
        return weight_shape[0] * weight_shape[1]  # D x 4H gate units

    def macs(self, node, weight_shape, output_shape):
        """Every step multiplies x_t by W^T and h by R^T: 4H x (K + H) products per direction."""
        directions, gates, inputs = weight_shape
        return int(output_shape[0]) * directions * gates * (inputs + gates // 4)


class FusedAttentionKind(LayerKind):
    """The transformer optimizer's com.microsoft Attention: the Q, K and V projections fused into one weight
    [K, 3H] (plus bias), then scores, softmax and context in float. quantize_dynamic makes it QAttention, which
    takes the input as uint8 codes from a DynamicQuantizeLinear with their scale and zero point, and int8 weight
    codes per tensor or per column: b-bit codes of both are an exact equivalent at every width. Only the
    projection is quantized, and only its products count as MACs."""

    op_type = "Attention"
    selector = "fused-attention"
    # what QAttention takes: input, weights, bias, mask_index, past (no attention_bias, no unequal Q/K/V sizes)
    MAX_INPUTS = 5

    def weight_input(self, node, initializers):
        if (len(node.input) > self.MAX_INPUTS or node_attribute(node, "qkv_hidden_sizes", None)
                or node_attribute(node, "do_rotary", 0) or node_attribute(node, "past_present_share_buffer", 0)):
            return None
        weight = node.input[1] if len(node.input) > 1 else ""
        return weight if weight in initializers and len(initializers[weight].dims) == 2 else None

    def runtime_inputs(self, node: onnx.NodeProto) -> list[str]:
        """Inputs besides x, weight and bias that the node takes at run time: mask_index and past."""
        return (list(node.input[3:self.MAX_INPUTS]) + ["", ""])[:2]

    def macs(self, node, weight_shape, output_shape):
        """Every token is multiplied by the [K, 3H] weight: K x 3H products each."""
        return int(np.prod(output_shape[1:-1], dtype=np.int64)) * weight_shape[0] * weight_shape[1]


class FusedEmbeddingKind(LayerKind):
    """The transformer optimizer's com.microsoft EmbedLayerNormalization: word, position and segment tables
    summed, then layer-normalized. quantize_dynamic makes it QEmbedLayerNormalization, which stores the tables
    and the norm's gamma and beta as asymmetric uint8 per tensor (arithmetic.table_codes, 8 bits whatever the
    weight type) and dequantizes them as it reads: b-bit codes are an exact equivalent. Selected by @embedding
    too, so one rule covers fused and unfused embeddings."""

    op_type = "EmbedLayerNormalization"
    selector = "fused-embedding"
    also_selected_by = ("embedding",)
    weight_only = True
    matrix_kernel = False
    # input_ids, segment_ids, word, position, segment tables, gamma, beta, mask (no position_ids)
    MAX_INPUTS = 8
    TABLES = (2, 3, 4, 5, 6)  # word, position and segment tables, gamma, beta: every constant it quantizes

    def weight_input(self, node, initializers):
        if len(node.input) > self.MAX_INPUTS or len(node.output) > 2:
            return None
        if any(node.input[i] not in initializers for i in (2, 3, 5, 6)):
            return None
        return node.input[2]

    def activation_input(self, node):
        return node.input[0]

    def bias_input(self, node):
        return None

    def parameter_inputs(self, node, initializers):
        return [node.input[i] for i in self.TABLES if i < len(node.input) and node.input[i] in initializers]

    def output_channels(self, node, weight_shape):
        return 1

    def scale_axis(self, per_channel):
        return None

    def macs(self, node, weight_shape, output_shape):
        return 0


KINDS: dict[str, LayerKind] = {kind.selector: kind for kind in (ConvKind(), MatMulKind(), GemmKind(), EmbeddingKind(),
                                                                ActivationMatMulKind(), LSTMKind(), FusedAttentionKind(),
                                                                FusedEmbeddingKind())}


def kind_of(node: onnx.NodeProto, initializers: dict) -> LayerKind | None:
    """The layer kind of a node, or None when it is not a quantizable layer."""
    return next((kind for kind in KINDS.values() if kind.op_type == node.op_type and kind.qualifies(node, initializers)),
                None)


def _per_sample(output_shape: tuple) -> int:
    return int(np.prod([d for d in output_shape[1:]], dtype=np.int64))
