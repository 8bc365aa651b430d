"""Cross-layer equalization: rescale consecutive layers so that their per-channel weight ranges even out, leaving the
network's function unchanged (Nagel et al., 2019, "Data-Free Quantization").

Between a layer A and the next layer B, an operation f with f(x / s) = f(x) / s for every s > 0 (ReLU, max and
average pooling) lets output channel i of A be divided by s_i and input channel i of B multiplied by it. With
s_i = sqrt(r_A,i / r_B,i), r being the channel's largest |weight|, both channels end with the range
sqrt(r_A,i r_B,i): a channel whose weights are small next to its layer's largest no longer gets only a few of a
per-tensor 4-bit weight's codes. A robust student starts from the equalized teacher (distill --equalize).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from .layer_kinds import node_attribute
from .onnx_graph import LoadedModel
from .sim.model import SimModel

# operations between two layers that commute with a positive per-channel scale
POSITIVE_HOMOGENEOUS = ("Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
LINEAR_OPS = ("Conv", "MatMul", "Gemm")
SWEEPS = 10  # passes over the pairs: a layer in two pairs (B of one, A of the next) moves with each


def _input_axis(output_axis: int) -> int:
    """The axis of an engine-layout weight that indexes input channels: Conv [Cout, Cin, ...], MatMul [K, N]."""
    return 1 if output_axis == 0 else 0


def equalizable_pairs(model: LoadedModel, sim: SimModel) -> list[tuple[str, str]]:
    """(A, B) layer names where A's output reaches only B, through positively homogeneous operations alone, each
    value along the way read by one node; A's bias (if any) is per output channel, both are plain Conv (one
    group), MatMul or Gemm layers, and B's input channels are A's output channels."""
    layers = {layer.name: layer for layer in model.layers}
    nodes = {node.name: node for node in model.proto.graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in model.proto.graph.output}

    def plain(name: str) -> bool:
        layer = layers.get(name)
        if layer is None or (layer.kind_name or layer.op_type) not in LINEAR_OPS:
            return False
        return nodes[name].op_type != "Conv" or node_attribute(nodes[name], "group", 1) == 1

    pairs = []
    for node in model.proto.graph.node:
        if not plain(node.name):
            continue
        value, reader = node.output[0], None
        while value not in graph_outputs and len(readers.get(value, [])) == 1:
            reader = readers[value][0]
            if reader.op_type not in POSITIVE_HOMOGENEOUS:
                break
            value = reader.output[0]
        if reader is None or reader.input[0] != value or not plain(reader.name):
            continue
        first, second = sim.quant_layer(node.name), sim.quant_layer(reader.name)
        channels = first.weight.shape[first.kind.output_axis]
        bias_fits = first.bias is None or first.bias.numel() == channels
        if bias_fits and second.weight.shape[_input_axis(second.kind.output_axis)] == channels:
            pairs.append((node.name, reader.name))
    return pairs


def _channel_ranges(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """The largest |weight| of each slice along `axis`, in float64."""
    other = tuple(a for a in range(weight.dim()) if a != axis)
    return weight.detach().double().abs().amax(dim=other)


def _along(values: torch.Tensor, axis: int, dims: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along `axis` of a `dims`-dimensional tensor."""
    shape = [1] * dims
    shape[axis] = -1
    return values.reshape(shape)


def equalize(sim: SimModel, pairs: list[tuple[str, str]], sweeps: int = SWEEPS) -> None:
    """Rescale each pair's weights in place (A's output channels and bias by 1 / s, B's input channels by s);
    the sim's float function is unchanged up to float32 rounding."""
    with torch.no_grad():
        for _ in range(sweeps):
            for first_name, second_name in pairs:
                first, second = sim.quant_layer(first_name), sim.quant_layer(second_name)
                out_axis = first.kind.output_axis
                in_axis = _input_axis(second.kind.output_axis)
                first_range = _channel_ranges(first.weight, out_axis)
                second_range = _channel_ranges(second.weight, in_axis)
                usable = (first_range > 0) & (second_range > 0)
                scale = torch.where(usable, torch.sqrt(first_range / torch.where(usable, second_range, 1.0)), 1.0)
                first.weight.copy_((first.weight.double() / _along(scale, out_axis, first.weight.dim())).float())
                if first.bias is not None:
                    first.bias.copy_((first.bias.double() / scale.reshape(first.bias.shape)).float())
                second.weight.copy_((second.weight.double() * _along(scale, in_axis, second.weight.dim())).float())


def range_spread(sim: SimModel, names) -> float:
    """The median over `names` of a layer's median channel range over its largest: 1 when every output channel
    spans the layer's whole per-tensor range (what equalization raises)."""
    spreads = []
    for name in names:
        layer = sim.quant_layer(name)
        ranges = _channel_ranges(layer.weight, layer.kind.output_axis)
        spreads.append(float((ranges / ranges.max()).median()) if float(ranges.max()) > 0 else 1.0)
    return float(np.median(spreads)) if spreads else 1.0
