"""The simulator's LSTM layer: ORT's DynamicQuantizeLSTM arithmetic (and the rewrite's unfused graph below 8 bits).

At a setting, W and R become symmetric codes per direction (or per gate unit), X is quantized once over every
step and the batch, and at each step the previous hidden state is quantized and multiplied by R; both products
run on the u8 x s8 kernel (saturating on avx2-u8s8), are scaled by (activation scale x weight scale) and
summed before the biases, as ORT's kernel does. One detail depends on the ORT session rather than the CPU:
DynamicQuantizeLSTM splits the batch among its intra-op threads when computing the recurrent product, and each
block of rows gets its own range (ceil(batch / threads) rows, once the batch is big enough to split). At batch
size 1 there is nothing to split; above it, the thread count is part of the arithmetic.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn as nn

from ..arithmetic import activation_scale_zero_point, centered_activation_codes, weight_codes
from ..kernels import PROBE_IR_VERSION, detect_kernel_family, product_plan, saturating_product
from ..layer_kinds import KINDS
from ..onnx_graph import CONTRIB_DOMAIN
from ..policy import LayerQuant
from .ops import lstm_forward

FUSED_ACTIVATION_BITS = 8  # DynamicQuantizeLSTM's only width; the rewrite unfuses other widths (recurrent_graph.py)


def state_block_rows(batch: int, hidden: int, threads: int) -> int:
    """Rows of the hidden state sharing one quantization range in DynamicQuantizeLSTM's recurrent product: it
    splits the batch among `threads` once the batch is large enough (its uni_directional_lstm.cc: batch > 4, or
    batch >= 2 with hidden <= 256)."""
    if batch > 4 or (batch >= 2 and hidden <= 256):
        return math.ceil(batch / max(1, threads))
    return batch


@functools.cache
def detect_default_threads() -> int:
    """The intra-op thread count ORT's CPU sessions use when asked for 0 (its default), measured: a
    DynamicQuantizeLSTM over 240 hidden states with one range per block of rows matches only the emulation with
    the right block size."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    batch, hidden, steps = 240, 2, 2
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (1, 2, 4 * hidden)).astype(np.int8)
    r = rng.integers(-127, 128, (1, hidden, 4 * hidden)).astype(np.int8)
    w[0, 0, 0] = r[0, 0, 0] = 127  # so that 8-bit codes of (codes x 0.01) are the codes again
    # each row's scale differs a lot, so blocks of different sizes give different ranges
    x = (rng.normal(size=(steps, batch, 2)) * np.linspace(0.1, 10, batch)[None, :, None]).astype(np.float32)
    one = np.ones(1, np.float32)
    zero = np.zeros(1, np.int8)
    tensors = {"W": w, "R": r, "ws": one * 0.01, "wz": zero, "rs": one * 0.01, "rz": zero}
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLSTM", ["x", "W", "R", "", "", "", "", "", "ws", "wz", "rs", "rz"], ["y"],
                          hidden_size=hidden, domain=CONTRIB_DOMAIN)],
        "threads_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid(CONTRIB_DOMAIN, 1)],
                              ir_version=PROBE_IR_VERSION)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (measured,) = session.run(None, {"x": x})
    errors = {}
    with torch.inference_mode(False), torch.no_grad():  # first called from a forward, maybe in inference mode
        layer = QuantLSTM.from_codes(w, r, hidden)
        for threads in range(1, 65):
            rows = state_block_rows(batch, hidden, threads)
            if any(state_block_rows(batch, hidden, t) == rows for t in errors):
                continue  # the same blocks as a smaller count: indistinguishable here, and the smaller count is kept
            layer.threads = threads
            y = layer(torch.from_numpy(x), setting=LayerQuant(8, 8))[0].numpy()
            errors[threads] = float(np.abs(y - measured).max())
    return min(errors, key=errors.get)


class QuantLSTM(nn.Module):
    """An LSTM layer; forward(x, sequence_lens, initial_h, initial_c, p, setting) -> (Y, Y_h, Y_c), in float
    (setting None) or as ORT runs the quantized LSTM at that setting."""

    kind = KINDS["lstm"]
    nonnegative_input = False

    def __init__(self, name: str, attrs: dict, weight: np.ndarray, recurrent: np.ndarray, bias: np.ndarray | None,
                 kernel_family: str, threads: int = 0):
        """threads: the ORT session's intra-op threads (0: its default, measured once)."""
        super().__init__()
        self.name = name
        self.attrs = attrs
        self.kernel_family = kernel_family
        self.threads = threads
        self.weight = nn.Parameter(torch.from_numpy(np.array(weight, dtype=np.float32)))
        self.recurrent = nn.Parameter(torch.from_numpy(np.array(recurrent, dtype=np.float32)))
        self.bias = nn.Parameter(torch.from_numpy(np.array(bias, dtype=np.float32))) if bias is not None else None
        self._cache: dict = {}

    @classmethod
    def from_codes(cls, w_codes: np.ndarray, r_codes: np.ndarray, hidden: int) -> "QuantLSTM":
        """An LSTM whose weights are int8 codes in DynamicQuantizeLSTM's [D, K, 4H] layout times 0.01 (ORT's
        graph gives them scale 0.01 per tensor), for probing ORT."""
        weight = np.transpose(w_codes, (0, 2, 1)).astype(np.float32) * 0.01
        recurrent = np.transpose(r_codes, (0, 2, 1)).astype(np.float32) * 0.01
        return cls("probe", {"hidden_size": hidden}, weight, recurrent, None, detect_kernel_family())

    def trained_initializers(self, node) -> dict[str, np.ndarray]:
        """W, R and B as this layer holds them now."""
        values = {node.input[1]: self.weight, node.input[2]: self.recurrent}
        if self.bias is not None:
            values[node.input[3]] = self.bias
        return {name: value.detach().cpu().numpy() for name, value in values.items()}

    def _codes(self, weight: torch.Tensor, setting: LayerQuant) -> list[tuple]:
        """Per direction: (codes [K, 4H] as the product takes them, scale [4H] or [1], pairs that can saturate,
        whether float32 sums of the product stay exact)."""
        parts = []
        for w in weight:
            codes, scale = weight_codes(w, setting.weight_bits, 0 if setting.per_channel else None)
            codes_t = codes.t()
            exact_in_float32, pairs = product_plan(codes_t, setting.activation_bits, 1, self.kernel_family)
            parts.append((codes_t, scale.reshape(-1), pairs, exact_in_float32))
        return parts

    def _quantized(self, setting: LayerQuant) -> tuple[list, list]:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self._codes(self.weight, setting), self._codes(self.recurrent, setting)
        key = (setting, self.weight._version, self.recurrent._version)
        if key not in self._cache:
            with torch.no_grad():
                self._cache = {key: (self._codes(self.weight, setting), self._codes(self.recurrent, setting))}
        return self._cache[key]

    @staticmethod
    def _product(codes: torch.Tensor, zero_point: torch.Tensor, part: tuple, exact_products: bool) -> torch.Tensor:
        """(codes - zero point) x weight codes as the CPU's kernel adds them up, in float32."""
        weight, _, pairs, exact_in_float32 = part
        if pairs is not None and not exact_products:
            return saturating_product(codes, zero_point, weight, pairs)
        if exact_in_float32:
            return codes @ weight
        return (codes.double() @ weight.double()).float()

    def forward(self, x, sequence_lens=None, initial_h=None, initial_c=None, p=None,
                setting: LayerQuant | None = None, ranges: str = "batch", exact_products: bool = False):
        if setting is None:
            return lstm_forward(self.attrs, x, self.weight, self.recurrent, self.bias, sequence_lens, initial_h,
                                initial_c, p)
        bits = setting.activation_bits
        w_parts, r_parts = self._quantized(setting)
        per_sample = ranges == "sample"
        hidden = self.recurrent.shape[-1]
        fused = bits == FUSED_ACTIVATION_BITS
        threads = self.threads or detect_default_threads()

        def project(inputs, d):  # inputs [seq, batch, K]
            steps = inputs if sequence_lens is None or not len(sequence_lens) else inputs[:int(sequence_lens.max())]
            by_sample = steps.transpose(0, 1)  # ranges per input run along the batch axis
            scale, zero_point = activation_scale_zero_point(by_sample, bits, per_sample)
            scale, zero_point = scale.transpose(0, 1), zero_point.transpose(0, 1)
            codes = centered_activation_codes(inputs, scale, zero_point, bits)
            acc = self._product(codes, zero_point, w_parts[d], exact_products)
            return acc * (scale * w_parts[d][1])

        def recur(h, d):  # h [batch, hidden]
            batch = h.shape[0]
            rows = 1 if per_sample else state_block_rows(batch, hidden, threads) if fused else batch
            blocks = -(-batch // rows)
            # each block's range at once: the last block padded with copies of its first row, which leave it unchanged
            padded = torch.cat([h, h[(blocks - 1) * rows:][:1].expand(blocks * rows - batch, -1)])
            scale, zero_point = activation_scale_zero_point(padded.reshape(blocks, rows * hidden), bits, True)
            scale = scale.repeat_interleave(rows, dim=0)[:batch]
            zero_point = zero_point.repeat_interleave(rows, dim=0)[:batch]
            codes = centered_activation_codes(h, scale, zero_point, bits)
            acc = self._product(codes, zero_point, r_parts[d], exact_products)
            return acc * (scale * r_parts[d][1])

        return lstm_forward(self.attrs, x, self.weight, self.recurrent, self.bias, sequence_lens, initial_h,
                            initial_c, p, project=project, recur=recur)
