"""The simulator: an ONNX classifier as a torch module whose quantizable layers take their bit-widths
at call time and compute ONNX Runtime's integer arithmetic exactly (with straight-through gradients)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from onnx import numpy_helper

from ..arithmetic import (activation_code_max, activation_scale_zero_point, centered_activation_codes, table_codes,
                          weight_codes)
from ..errors import PtqauditError
from ..kernels import EXACT, EXACT_FLOAT32_LIMIT, detect_kernel_family, product_plan, saturating_product
from ..onnx_graph import Layer, LoadedModel, upgrade_opset
from ..policy import LayerQuant, ResolvedPolicy
from ..text_data import feeds
from .ops import OPS, attention_from_projection, attributes
from .recurrent import QuantLSTM

OPS_OPSET = 13  # the op handlers follow opset-13+ semantics; older graphs are converted first
RANGES = ("batch", "sample")  # activation range over the whole batch (ORT), or per input (batch size 1)


class QuantLayer(nn.Module):
    """One quantizable layer, its product given by its layer kind; forward(x, setting) runs it in float
    (setting None) or as ORT's integer kernel would: int codes, exact integer products,
    float32(acc) * (x_scale * w_scale) + bias."""

    range_gradient = False  # training: the scales pass a gradient to the ranges they are measured from (SimModel)

    def __init__(self, layer: Layer, attrs: dict, weight: np.ndarray, bias: np.ndarray | None,
                 nonnegative_input: bool = False, kernel_family: str = EXACT):
        super().__init__()
        self.name = layer.name
        self.weight_name = layer.weight_name
        self.kernel_family = kernel_family  # the integer arithmetic of the CPU being simulated (kernels.py)
        self.nonnegative_input = nonnegative_input  # input comes from a ReLU: its minimum is known to be >= 0
        self.kind = layer.kind
        self.attrs = attrs
        self.weight = nn.Parameter(torch.from_numpy(np.array(weight, dtype=np.float32)))
        self.bias = nn.Parameter(torch.from_numpy(np.array(bias, dtype=np.float32))) if bias is not None else None
        self._weight_cache: dict = {}

    def _linear(self, x, weight, bias):
        return self.kind.float_product(x, weight, bias, self.attrs)

    def trained_initializers(self, node) -> dict[str, np.ndarray]:
        """The node's weight and bias initializers as this layer holds them now (back in the stored layout)."""
        values = {self.weight_name: self.kind.engine_weight(node, self.weight.detach().cpu().numpy())}
        if self.bias is not None:
            values[self.kind.bias_input(node)] = self.bias.detach().cpu().numpy()
        return values

    def _weight_at(self, setting: LayerQuant) -> tuple[torch.Tensor, torch.Tensor, bool, tuple | None]:
        """Codes, scale, whether float32 sums stay exact, and the weight pairs this CPU's kernel can saturate
        on (kernels.risky_pairs; None when it cannot saturate here)."""
        if self.kind.weight_only:
            codes, scale, _ = table_codes(self.weight, setting.weight_bits)
            return codes, scale, True, None
        codes, scale = weight_codes(self.weight, setting.weight_bits, self.kind.scale_axis(setting.per_channel),
                                    self.range_gradient)
        exact, pairs = product_plan(codes, setting.activation_bits, self.kind.output_axis, self.kernel_family,
                                    self.kind.matrix_kernel)
        return codes, scale, exact, pairs

    def _quantized_weight(self, setting: LayerQuant) -> tuple[torch.Tensor, torch.Tensor, bool, tuple | None]:
        """_weight_at, cached per setting while the weight is not being trained (the key includes the
        parameter's version counter)."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self._weight_at(setting)
        key = (setting, self.weight._version)
        if key not in self._weight_cache:
            with torch.no_grad():
                quantized = self._weight_at(setting)
            self._weight_cache = {k: v for k, v in self._weight_cache.items() if k[1] == self.weight._version}
            self._weight_cache[key] = quantized
        return self._weight_cache[key]

    def forward(self, x: torch.Tensor, setting: LayerQuant | None, ranges: str = "batch",
                exact_products: bool = False) -> torch.Tensor:
        """exact_products: the policy's kernel options make ORT's products exact on this CPU too
        (policy.KernelOptions), so the kernel family's saturation does not apply."""
        if setting is None:
            return self._linear(x, self.weight, self.bias)
        if self.kind.weight_only:  # DequantizeLinear of the codes looked up: (code - zero point) * scale, as ORT
            w_codes, w_scale, _, _ = self._quantized_weight(setting)
            return self._linear(x, w_codes * w_scale, self.bias)
        x_scale, x_zero_point = activation_scale_zero_point(x, setting.activation_bits, ranges == "sample",
                                                            self.nonnegative_input, self.range_gradient)
        x_codes = centered_activation_codes(x, x_scale, x_zero_point, setting.activation_bits, self.nonnegative_input)
        w_codes, w_scale, exact_in_float32, pairs = self._quantized_weight(setting)
        # MLAS's AVX2 u8 x s8 kernel sums raw uint8 codes in int16-saturated pairs, then corrects the zero point
        if pairs is not None and not exact_products:
            acc = saturating_product(x_codes, x_zero_point, w_codes, pairs)
        elif exact_in_float32:
            acc = self._linear(x_codes, w_codes, None)
        else:  # sums could pass 2^24: accumulate in float64, exact like ORT's int32, then round as its Cast does
            acc = self._linear(x_codes.double(), w_codes.double(), None).float()
        # scales shaped to the output: per-sample x_scale on axis 0, per-channel w_scale on the channel axis
        x_scale = x_scale.reshape(x_scale.shape[0], *([1] * (acc.dim() - 1)))
        w_scale = self.kind.along_output_channels(w_scale.reshape(-1), acc.dim())
        bias = None if self.bias is None else self.kind.along_output_channels(self.bias, acc.dim())
        scale = x_scale * w_scale
        # in place where the scales take no gradient: acc is a fresh tensor, and then no op needs it for its gradient
        y = acc * scale if scale.requires_grad else acc.mul_(scale)
        return y if bias is None else y.add_(bias)


class ActivationProduct(nn.Module):
    """A MatMul of two activations (attention scores, context); forward(a, b, setting) runs it in float (setting
    None) or as ORT's u8 x u8 MatMulInteger would with MatMulConstBOnly off: both operands quantized on the fly
    (A at the activation width, B at the weight width), exact integer product (the u8 x u8 kernel is exact on
    every CPU), float32(acc) * (a_scale * b_scale)."""

    weight = bias = None  # nothing constant to quantize or train
    range_gradient = False  # as QuantLayer's

    def trained_initializers(self, node) -> dict[str, np.ndarray]:
        return {}

    def __init__(self, layer: Layer):
        super().__init__()
        self.name = layer.name
        self.kind = layer.kind
        self.nonnegative_input = False

    def forward(self, a: torch.Tensor, b: torch.Tensor, setting: LayerQuant | None, ranges: str = "batch",
                exact_products: bool = False) -> torch.Tensor:
        if setting is None:
            return torch.matmul(a, b)
        per_sample = ranges == "sample"
        a_scale, a_zero_point = activation_scale_zero_point(a, setting.activation_bits, per_sample,
                                                            range_gradient=self.range_gradient)
        b_scale, b_zero_point = activation_scale_zero_point(b, setting.weight_bits, per_sample,
                                                            range_gradient=self.range_gradient)
        a_codes = centered_activation_codes(a, a_scale, a_zero_point, setting.activation_bits)
        b_codes = centered_activation_codes(b, b_scale, b_zero_point, setting.weight_bits)
        bound = a.shape[-1] * activation_code_max(setting.activation_bits) * activation_code_max(setting.weight_bits)
        if bound < EXACT_FLOAT32_LIMIT:
            acc = torch.matmul(a_codes, b_codes)
        else:  # sums could pass 2^24: accumulate in float64, exact like ORT's int32, then round as its Cast does
            acc = torch.matmul(a_codes.double(), b_codes.double()).float()
        scales = (a_scale * b_scale).reshape(a_scale.shape[0], *([1] * (acc.dim() - 1)))
        return acc * scales


class QuantAttention(QuantLayer):
    """The optimizer's fused Attention: its input projection is the quantized layer (QAttention's integer product,
    scale, then bias), the scores, softmax and context after it run in float."""

    def forward(self, x, mask_index=None, past=None, setting: LayerQuant | None = None, ranges: str = "batch",
                exact_products: bool = False):
        qkv = super().forward(x, setting, ranges, exact_products)
        return attention_from_projection(self.attrs, qkv, mask_index, past)


class QuantEmbedLayerNorm(nn.Module):
    """The optimizer's fused EmbedLayerNormalization: word, position and segment tables and the norm's gamma and
    beta, each dequantized from its per-tensor codes at a setting (QEmbedLayerNormalization), then the same
    lookup, sum and layer norm as in float."""

    nonnegative_input = False
    bias = None

    def __init__(self, layer: Layer, attrs: dict, node, tables: dict[int, np.ndarray]):
        super().__init__()
        self.name, self.kind, self.attrs = layer.name, layer.kind, attrs
        self.initializer_names = {index: node.input[index] for index in tables}
        self.tables = nn.ParameterDict({str(index): nn.Parameter(torch.from_numpy(np.array(table, dtype=np.float32)))
                                        for index, table in tables.items()})
        self._cache: dict = {}

    @property
    def weight(self) -> nn.Parameter:
        """The word table (what layer statistics read)."""
        return self.tables["2"]

    def trained_initializers(self, node) -> dict[str, np.ndarray]:
        return {self.initializer_names[int(index)]: table.detach().cpu().numpy() for index, table in self.tables.items()}

    def _dequantized(self, bits: int) -> dict[int, torch.Tensor]:
        """Each table as QEmbedLayerNormalization reads it: (code - zero point) x scale."""
        def dequantize():
            codes_and_scales = {int(index): table_codes(table, bits)[:2] for index, table in self.tables.items()}
            return {index: codes * scale for index, (codes, scale) in codes_and_scales.items()}
        if torch.is_grad_enabled() and any(table.requires_grad for table in self.tables.values()):
            return dequantize()
        key = (bits, tuple(table._version for table in self.tables.values()))
        if key not in self._cache:
            with torch.no_grad():
                self._cache = {key: dequantize()}
        return self._cache[key]

    def forward(self, input_ids, segment_ids=None, mask=None, setting: LayerQuant | None = None,
                ranges: str = "batch", exact_products: bool = False):
        tables = ({int(index): table for index, table in self.tables.items()} if setting is None
                  else self._dequantized(setting.weight_bits))
        return OPS["EmbedLayerNormalization"](self.attrs, input_ids, segment_ids, tables[2], tables[3], tables.get(4),
                                              tables[5], tables[6], mask)[:2]


# ops whose output is >= 0 whenever their first input is (so a ReLU's sign survives them)
SIGN_PRESERVING_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
                       "Transpose", "Identity", "Squeeze", "Unsqueeze", "Dropout"}


def _nonnegative_tensors(graph) -> set[str]:
    """Tensors that are >= 0 by construction: ReLU outputs and what sign-preserving ops make of them."""
    known: set[str] = set()
    for node in graph.node:
        if node.op_type == "Relu" or (node.op_type in SIGN_PRESERVING_OPS and node.input and node.input[0] in known):
            known.add(node.output[0])
    return known


def _preferred_layout(x: torch.Tensor) -> torch.Tensor:
    """Images in channels-last layout, which oneDNN's CPU convolutions run without reordering."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _run_op(step: "_Step", args: list):
    """One ONNX op in torch; a tensor larger than memory (a hostile or broken graph) is bad input, not a bug."""
    try:
        return OPS[step.op_type](step.attrs, *args)
    except RuntimeError as error:  # torch's CPU allocator failure is a plain RuntimeError
        if "allocate" not in str(error):
            raise
        raise PtqauditError(f"the model's {step.op_type} node producing {step.outputs[0]!r} asks for more memory "
                            f"than this machine has ({str(error).splitlines()[0]})") from error


@dataclass
class _Step:
    """One node to run per forward: an op from OPS, or a quantizable layer."""

    op_type: str
    inputs: list[str]  # "" for an absent optional input
    outputs: list[str]
    attrs: dict
    layer: str | None = None  # the layer name when this step is a QuantLayer
    frees: tuple[str, ...] = ()  # tensors no later step reads, dropped after this step


def prepare_device(device: str) -> None:
    """Make torch's float32 arithmetic on `device` as exact as the simulator needs: CUDA's TF32 mode (on by default
    for convolutions) would round the integer products the simulator keeps exact in float32."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


class SimModel(nn.Module):
    """ONNX graph interpreted with torch ops; constant sub-graphs are folded once at construction."""

    def __init__(self, model: LoadedModel, kernel_family: str | None = None, ort_threads: int = 0):
        """kernel_family: the integer arithmetic to reproduce (ptqaudit.kernels); None: this machine's.
        ort_threads: the intra-op threads of the ORT sessions reproduced (0: ORT's default), on which an LSTM's
        quantized arithmetic depends above batch size 1 (sim/recurrent.py)."""
        super().__init__()
        self.kernel_family = kernel_family or detect_kernel_family()
        graph = upgrade_opset(model.proto, OPS_OPSET).graph
        self.inputs = model.inputs  # (name, NumPy dtype) of each graph input
        self.output_name = graph.output[0].name
        self.layer_names = [layer.name for layer in model.layers]
        stored = {init.name: init for init in graph.initializer}
        initializers = {name: numpy_helper.to_array(init) for name, init in stored.items()}
        layer_by_name = {layer.name: layer for layer in model.layers}
        unsupported = sorted({n.op_type for n in graph.node if n.op_type not in OPS and n.name not in layer_by_name})
        if unsupported:
            raise PtqauditError(f"the simulator does not support op(s) {', '.join(unsupported)} in {model.path}")

        nonnegative = _nonnegative_tensors(graph)
        self.quant_layers = nn.ModuleDict()
        self._module_key: dict[str, str] = {}
        constants: dict[str, torch.Tensor] = {}
        layer_weights = set()
        steps: list[_Step] = []
        for node in graph.node:
            if node.name in layer_by_name:
                layer = layer_by_name[node.name]
                key = f"layer{layer.index}"
                module, step = self._layer_module(node, layer, initializers, constants, nonnegative, ort_threads)
                self.quant_layers[key] = module
                self._module_key[layer.name] = key
                layer_weights.update(layer.kind.parameter_inputs(node, stored))
                steps.append(step)
                continue
            step = _Step(node.op_type, list(node.input), list(node.output), attributes(node))
            if all(name == "" or name in initializers or name in constants for name in step.inputs):
                self._fold(step, initializers, constants)
            else:
                steps.append(step)
        used = {name for step in steps for name in step.inputs}
        for name, value in initializers.items():
            if name in used and name not in layer_weights:
                constants[name] = torch.from_numpy(np.array(value))
        self._constants = {name: value for name, value in constants.items() if name in used}
        self.steps = self._plan_frees(steps)

    def _layer_module(self, node, layer: Layer, initializers: dict, constants: dict, nonnegative: set[str],
                      ort_threads: int) -> tuple[nn.Module, _Step]:
        """The module computing a layer, and the step feeding it (its activation, then what it takes at run time)."""
        kind, attrs = layer.kind, attributes(node)
        if not layer.weight_name:
            return ActivationProduct(layer), _Step(node.op_type, list(node.input), [node.output[0]], {}, layer=layer.name)
        if kind.op_type == "LSTM":
            bias_name = kind.bias_input(node)
            module = QuantLSTM(layer.name, attrs, initializers[layer.weight_name], initializers[kind.recurrent_input(node)],
                               initializers[bias_name] if bias_name else None, self.kernel_family, ort_threads)
            runtime = (list(node.input[4:8]) + [""] * 4)[:4]  # sequence_lens, initial_h, initial_c, P
            return module, _Step(node.op_type, [node.input[0]] + runtime, list(node.output), {}, layer=layer.name)
        if kind.op_type == "EmbedLayerNormalization":
            tables = {i: initializers[node.input[i]] for i in kind.TABLES if i < len(node.input) and node.input[i]}
            mask = node.input[7] if len(node.input) > 7 else ""
            return (QuantEmbedLayerNorm(layer, attrs, node, tables),
                    _Step(node.op_type, [node.input[0], node.input[1], mask], list(node.output), {}, layer=layer.name))
        weight = kind.engine_weight(node, initializers[layer.weight_name])
        bias_name = kind.bias_input(node)
        # a bias the exporter shared with an equal one reaches the node through an Identity: folded by now
        bias = (initializers[bias_name] if bias_name in initializers
                else constants[bias_name].numpy() if bias_name else None)
        activation = kind.activation_input(node)
        if kind.op_type == "Attention":
            module = QuantAttention(layer, attrs, weight, bias, False, self.kernel_family)
            return module, _Step(node.op_type, [activation, *kind.runtime_inputs(node)], list(node.output), {},
                                 layer=layer.name)
        module = QuantLayer(layer, attrs, weight, bias, activation in nonnegative, self.kernel_family)
        return module, _Step(node.op_type, [activation], [node.output[0]], {}, layer=layer.name)

    def _apply(self, fn, *args, **kwargs):
        """.to(device) and friends move the folded constants too (they are not parameters or buffers:
        their ONNX names are not valid attribute names)."""
        super()._apply(fn, *args, **kwargs)
        self._constants = {name: fn(value) for name, value in self._constants.items()}
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def feed(self, x) -> dict[str, torch.Tensor]:
        """A batch from a Dataset (an image array, or TextInputs) as the graph's named input tensors."""
        return {name: torch.from_numpy(value).to(self.device) for name, value in feeds(x, self.inputs).items()}

    def _environment(self, x) -> dict[str, torch.Tensor]:
        """The tensors a forward starts from (images in the layout convolutions run fastest in): x is the image
        tensor, or the named input tensors."""
        if isinstance(x, torch.Tensor):
            ((name, _),) = self.inputs
            x = {name: x}
        return {name: _preferred_layout(value) for name, value in x.items()}

    @staticmethod
    def _fold(step: _Step, initializers, constants) -> None:
        args = [None if n == "" else constants[n] if n in constants else torch.from_numpy(np.array(initializers[n]))
                for n in step.inputs]
        outputs = _run_op(step, args)
        for name, value in zip(step.outputs, outputs if isinstance(outputs, tuple) else (outputs,)):
            constants[name] = value

    def _plan_frees(self, steps: list[_Step]) -> list[_Step]:
        last_use: dict[str, int] = {}
        for i, step in enumerate(steps):
            for name in step.inputs:
                last_use[name] = i
        for i, step in enumerate(steps):
            step.frees = tuple(n for n in step.inputs if last_use.get(n) == i and n not in self._constants
                               and n != self.output_name)
        return steps

    def set_range_gradient(self, on: bool) -> None:
        """Whether training passes a gradient through the quantized layers' scales to the ranges they are
        measured from (arithmetic._with_range_gradient); the forward pass is the same either way. Convolutions,
        matrix products and attention take it; an LSTM's and an embedding table's scales stay constants."""
        for module in self.quant_layers.values():
            if isinstance(module, (QuantLayer, ActivationProduct)):
                module.range_gradient = on

    def quant_layer(self, name: str) -> nn.Module:
        return self.quant_layers[self._module_key[name]]

    def weight_array(self, name: str) -> np.ndarray:
        """A layer's weight as NumPy (a product of two activations has none: one zero)."""
        weight = self.quant_layer(name).weight
        return weight.detach().cpu().numpy() if weight is not None else np.zeros(1, dtype=np.float32)

    def _run_step(self, step: _Step, env: dict, setting: LayerQuant | None, ranges: str,
                  exact_products: bool = False) -> None:
        args = [None if n == "" else env[n] if n in env else self._constants[n] for n in step.inputs]
        if step.layer is not None:
            outputs = self.quant_layers[self._module_key[step.layer]](*args, setting, ranges, exact_products)
        else:
            outputs = _run_op(step, args)
        for name, value in zip(step.outputs, outputs if isinstance(outputs, tuple) else (outputs,)):
            if name:
                env[name] = value
        for name in step.frees:
            env.pop(name, None)

    @staticmethod
    def _settings(policy) -> tuple[Mapping[str, LayerQuant | None], bool]:
        """(each layer's setting, whether the policy's kernel options make the products exact)."""
        if policy is None:
            return {}, False
        if isinstance(policy, ResolvedPolicy):
            return policy.mapping, policy.options.exact_products
        return policy, False

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor], policy: ResolvedPolicy | Mapping | None = None,
                ranges: str = "batch") -> torch.Tensor:
        """Logits of x (an image batch, or named input tensors: feed) under a policy (None or a layer missing from it: fp32). ranges="batch" measures each
        activation range over the whole batch, as ORT does for that batch; "sample" per input."""
        if ranges not in RANGES:
            raise ValueError(f"ranges must be one of {RANGES}, got {ranges!r}")
        settings, exact_products = self._settings(policy)
        env = self._environment(x)
        for step in self.steps:
            self._run_step(step, env, settings.get(step.layer) if step.layer else None, ranges, exact_products)
        return env[self.output_name]

    def forward_many(self, x: torch.Tensor | Mapping[str, torch.Tensor], policies: Sequence, ranges: str = "batch") -> list[torch.Tensor]:
        """Logits of x under each policy, computing once what policies share: the input and every
        activation before the first layer where their settings (or kernel options) differ (a depth-first
        walk of the policies' common prefixes)."""
        all_settings = [self._settings(p) for p in policies]
        results: list[torch.Tensor | None] = [None] * len(policies)

        def walk(start: int, env: dict, members: list[int]) -> None:
            for i in range(start, len(self.steps)):
                step = self.steps[i]
                if step.layer is None:
                    self._run_step(step, env, None, ranges)
                    continue
                groups = defaultdict(list)
                for m in members:
                    settings, exact_products = all_settings[m]
                    setting = settings.get(step.layer)
                    groups[setting, exact_products and setting is not None].append(m)  # fp32 is fp32 either way
                if len(groups) == 1:
                    ((setting, exact_products),) = groups
                    self._run_step(step, env, setting, ranges, exact_products)
                    continue
                for (setting, exact_products), group in groups.items():
                    branch = dict(env)
                    self._run_step(step, branch, setting, ranges, exact_products)
                    walk(i + 1, branch, group)
                return
            for m in members:
                results[m] = env[self.output_name]

        walk(0, self._environment(x), list(range(len(policies))))
        return results
