"""An LSTM below 8-bit activations as ONNX integer ops: the arithmetic of ORT's DynamicQuantizeLSTM, unfused.

DynamicQuantizeLSTM quantizes its activations itself, at 8 bits only. At fewer bits the rewrite spells the same
computation out: X quantized once over all steps and the batch and multiplied by W on MatMulInteger; then a
Scan whose step quantizes the previous hidden state (one range over the batch), multiplies it by R on
MatMulInteger, adds the input projection and both biases, and applies the gates (i, o, f, c; sigmoid, tanh,
tanh). Each direction is one Scan, the reverse one scanning backwards. Features the unfused graph does not
spell out (sequence lengths, peepholes, clip, input_forget, other activations) are refused by name.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import PtqauditError
from .layer_kinds import node_attribute

DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")


def unsupported_features(node: onnx.NodeProto) -> list[str]:
    """The LSTM features of a node the unfused graph does not reproduce."""
    features = []
    if len(node.input) > 4 and node.input[4]:
        features.append("sequence_lens")
    if len(node.input) > 7 and node.input[7]:
        features.append("peepholes (P)")
    if node_attribute(node, "clip", None) is not None:
        features.append("clip")
    if node_attribute(node, "input_forget", 0):
        features.append("input_forget")
    activations = [a.decode() if isinstance(a, bytes) else a for a in node_attribute(node, "activations", [])]
    if any(a != DEFAULT_ACTIVATIONS[i % 3] for i, a in enumerate(activations)):
        features.append(f"activations {', '.join(activations)}")
    return features


def unfused_lstm(rewriter, node: onnx.NodeProto, q, stem: str, w_parts: list, r_parts: list) -> list[onnx.NodeProto]:
    """The LSTM node as integer ops at q's widths (rewriter: quantize._Rewriter; w_parts, r_parts: each
    direction's (codes [K, 4H], scale, zero point) initializer names)."""
    features = unsupported_features(node)
    if features:
        raise PtqauditError(
            f"LSTM {node.name!r} uses {', '.join(features)}: below 8-bit activations ptqaudit runs an LSTM as an "
            "unfused integer graph, which does not reproduce that; give it 8-bit activations (ORT's "
            "DynamicQuantizeLSTM) or leave it in float"
        )
    opset = next(o.version for o in rewriter.model.opset_import if o.domain in ("", "ai.onnx"))
    hidden = int(node_attribute(node, "hidden_size", 0)) or int(
        rewriter.initializers[node.input[2]].dims[-1])
    directions = len(w_parts)
    reverse = node_attribute(node, "direction", b"forward") in (b"reverse", "reverse")
    x = node.input[0]
    nodes, x_quantized = rewriter.quantize_activation(x, q.activation_bits)

    def unsqueeze(tensor: str, axis: int, output: str) -> onnx.NodeProto:
        if opset >= 13:
            axes = rewriter.constant(f"{output}_axes", np.array([axis], dtype=np.int64))
            return helper.make_node("Unsqueeze", [tensor, axes], [output], name=output)
        return helper.make_node("Unsqueeze", [tensor], [output], axes=[axis], name=output)

    # zero initial states [batch, hidden] where the node has none
    zeros = f"{stem}_zero_state"
    nodes += [
        helper.make_node("Shape", [x], [f"{stem}_x_shape"], name=f"{stem}_x_shape"),
        helper.make_node("Slice", [f"{stem}_x_shape", rewriter.constant(f"{stem}_one", np.array([1], np.int64)),
                                   rewriter.constant(f"{stem}_two", np.array([2], np.int64))],
                         [f"{stem}_batch"], name=f"{stem}_batch"),
        helper.make_node("Concat", [f"{stem}_batch", rewriter.constant(f"{stem}_hidden", np.array([hidden], np.int64))],
                         [f"{stem}_state_shape"], axis=0, name=f"{stem}_state_shape"),
        helper.make_node("ConstantOfShape", [f"{stem}_state_shape"], [zeros], name=zeros,
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
    ]
    bias = node.input[3] if len(node.input) > 3 and node.input[3] else ""
    ys, finals_h, finals_c = [], [], []
    for d in range(directions):
        s = f"{stem}_d{d}"
        # input projection of every step: [seq, batch, 4H]
        nodes += _integer_product(f"{s}_x", x_quantized, w_parts[d], f"{s}_projection")
        states = []
        for k, initial in ((0, node.input[5] if len(node.input) > 5 else ""),
                           (1, node.input[6] if len(node.input) > 6 else "")):
            if not initial:
                states.append(zeros)
                continue
            picked = f"{s}_initial_{k}"
            nodes.append(helper.make_node("Gather", [initial, rewriter.constant(f"{picked}_index", np.array(d, np.int64))],
                                          [picked], axis=0, name=picked))
            states.append(picked)
        summed_bias = ""
        if bias:
            summed_bias = f"{s}_bias"
            nodes += [
                helper.make_node("Gather", [bias, rewriter.constant(f"{s}_bias_index", np.array(d, np.int64))],
                                 [f"{s}_bias_both"], axis=0, name=f"{s}_bias_both"),
                helper.make_node("Slice", [f"{s}_bias_both", rewriter.constant(f"{s}_w_start", np.array([0], np.int64)),
                                           rewriter.constant(f"{s}_w_end", np.array([4 * hidden], np.int64))],
                                 [f"{s}_w_bias"], name=f"{s}_w_bias"),
                helper.make_node("Slice", [f"{s}_bias_both", rewriter.constant(f"{s}_r_start", np.array([4 * hidden], np.int64)),
                                           rewriter.constant(f"{s}_r_end", np.array([8 * hidden], np.int64))],
                                 [f"{s}_r_bias"], name=f"{s}_r_bias"),
                helper.make_node("Add", [f"{s}_w_bias", f"{s}_r_bias"], [summed_bias], name=summed_bias),
            ]
        body = _step_graph(rewriter, s, q, hidden, summed_bias, r_parts[d])
        backwards = 1 if (reverse or d == 1) else 0
        outputs = [f"{s}_h_final", f"{s}_c_final", f"{s}_y"]
        nodes.append(helper.make_node("Scan", [*states, f"{s}_projection"], outputs, name=f"{s}_scan", body=body,
                                      num_scan_inputs=1, scan_input_directions=[backwards],
                                      scan_output_directions=[backwards]))
        nodes += [unsqueeze(f"{s}_y", 1, f"{s}_y_4d"), unsqueeze(f"{s}_h_final", 0, f"{s}_h_3d"),
                  unsqueeze(f"{s}_c_final", 0, f"{s}_c_3d")]
        ys.append(f"{s}_y_4d")
        finals_h.append(f"{s}_h_3d")
        finals_c.append(f"{s}_c_3d")
    for parts, axis, index in ((ys, 1, 0), (finals_h, 0, 1), (finals_c, 0, 2)):
        if len(node.output) > index and node.output[index]:
            nodes.append(helper.make_node("Concat", parts, [node.output[index]], axis=axis,
                                          name=f"{stem}_output_{index}"))
    return nodes


def _integer_product(stem: str, activation: tuple[str, str, str], weight: tuple[str, str, str],
                     output: str) -> list[onnx.NodeProto]:
    """MatMulInteger of (codes, scale, zero point) triples, then ORT's epilogue: Cast(int32) x (a_scale x w_scale)."""
    (a_codes, a_scale, a_zero_point), (w_codes, w_scale, w_zero_point) = activation, weight
    return [
        helper.make_node("MatMulInteger", [a_codes, w_codes, a_zero_point, w_zero_point], [f"{stem}_acc"],
                         name=f"{stem}_matmul_integer"),
        helper.make_node("Cast", [f"{stem}_acc"], [f"{stem}_acc_float"], to=TensorProto.FLOAT, name=f"{stem}_cast"),
        helper.make_node("Mul", [a_scale, w_scale], [f"{stem}_scales"], name=f"{stem}_scales"),
        helper.make_node("Mul", [f"{stem}_acc_float", f"{stem}_scales"], [output], name=output),
    ]


def _step_graph(rewriter, s: str, q, hidden: int, summed_bias: str,
                recurrence: tuple[str, str, str]) -> onnx.GraphProto:
    """One time step: (h, c, this step's input projection [batch, 4H]) -> (h', c', h'); recurrence: R's codes,
    scale and zero point."""
    h, c, projection = f"{s}_h", f"{s}_c", f"{s}_step_projection"
    nodes, h_quantized = rewriter.quantize_activation(h, q.activation_bits)
    gates = f"{s}_gates"
    nodes += _integer_product(f"{s}_h", h_quantized, recurrence, f"{s}_recurrent")
    nodes += [
        helper.make_node("Add", [projection, f"{s}_recurrent"], [gates if not summed_bias else f"{s}_products"],
                         name=f"{s}_products"),
    ]
    if summed_bias:
        nodes.append(helper.make_node("Add", [f"{s}_products", summed_bias], [gates], name=f"{s}_gates"))
    gate_names = ("i", "o", "f", "g")
    for k, gate in enumerate(gate_names):
        start = rewriter.constant(f"{s}_{gate}_start", np.array([k * hidden], np.int64))
        end = rewriter.constant(f"{s}_{gate}_end", np.array([(k + 1) * hidden], np.int64))
        axis = rewriter.constant(f"{s}_{gate}_axis", np.array([-1], np.int64))
        nodes += [
            helper.make_node("Slice", [gates, start, end, axis], [f"{s}_{gate}_in"], name=f"{s}_{gate}_slice"),
            helper.make_node("Tanh" if gate == "g" else "Sigmoid", [f"{s}_{gate}_in"], [f"{s}_{gate}"],
                             name=f"{s}_{gate}_act"),
        ]
    nodes += [
        helper.make_node("Mul", [f"{s}_f", c], [f"{s}_kept"], name=f"{s}_kept"),
        helper.make_node("Mul", [f"{s}_i", f"{s}_g"], [f"{s}_written"], name=f"{s}_written"),
        helper.make_node("Add", [f"{s}_kept", f"{s}_written"], [f"{s}_c_next"], name=f"{s}_c_next"),
        helper.make_node("Tanh", [f"{s}_c_next"], [f"{s}_c_tanh"], name=f"{s}_c_tanh"),
        helper.make_node("Mul", [f"{s}_o", f"{s}_c_tanh"], [f"{s}_h_next"], name=f"{s}_h_next"),
        helper.make_node("Identity", [f"{s}_h_next"], [f"{s}_y_step"], name=f"{s}_y_step"),
    ]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in (h, c, projection)]
    outputs = [helper.make_tensor_value_info(f"{s}_{name}", TensorProto.FLOAT, None)
               for name in ("h_next", "c_next", "y_step")]
    return helper.make_graph(nodes, f"{s}_step", inputs, outputs)
