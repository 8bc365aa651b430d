"""Bit-width policies: parse and validate policy files, resolve them per layer, cost them in BitOPs."""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import math
import re
import reprlib
from collections.abc import Hashable
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from .errors import PtqauditError
from .layer_kinds import KINDS
from .onnx_graph import Layer

BUILTIN_DIR = Path(__file__).parent / "policies"
MIN_BITS, MAX_BITS = 2, 8
GRANULARITIES = ("per-tensor", "per-channel")
FP32_BITS = 32  # what an unquantized layer costs per operand in BitOPs
SETTING_KEYS = ("weight_bits", "activation_bits", "granularity")
WEIGHT_TYPES = ("int8", "uint8")  # the container of the weight codes in the quantized graph (KernelOptions)
OPTION_KEYS = ("weight_type", "x64_quant_precision")  # policy-wide settings of ORT's integer kernels
FILE_KEYS = ("description", "default", "layers", *OPTION_KEYS)
# selectors that name layers by position or op type instead of by node name
SPECIAL_SELECTORS = ("@first", "@last", *(f"@{kind.selector}" for kind in KINDS.values()))
# Policy files may come from others, so what one may ask of the parser is bounded. An explicit policy
# naming 2,000 layers is ~230 KiB, and pure-Python YAML parses a few hundred KiB a second at best.
MAX_FILE_BYTES = 256 * 1024
# Collections inside collections: a policy needs 3 (the file, `layers`, a setting); one more lets a list
# written where a number belongs reach the message that names the field.
MAX_NESTING = 4
MAX_SELECTOR_CHARS = 256  # a glob's matcher is compiled in time that grows faster than its length
QUOTE_CHARS = 80  # the most of a user's value an error message quotes

_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, QUOTE_CHARS, QUOTE_CHARS


def _cut(text: str) -> str:
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def _quote(value) -> str:
    """A value from a policy as an error message quotes it: its repr, at most QUOTE_CHARS characters,
    computed without expanding the whole value (a file's value may be huge)."""
    return _cut(_SHORT_REPR.repr(value))


def _names(keys) -> str:
    """Key names for an error message: plain names as they are, others quoted, at most QUOTE_CHARS in all."""
    return _cut(", ".join(k if isinstance(k, str) and k.isprintable() else _quote(k) for k in keys))


@dataclass(frozen=True)
class LayerQuant:
    """How one layer is quantized: b-bit symmetric weights, b-bit dynamic unsigned activations."""

    weight_bits: int
    activation_bits: int
    per_channel: bool = False

    def __post_init__(self):
        for key in ("weight_bits", "activation_bits"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
                raise PtqauditError(f"{key} must be an integer from {MIN_BITS} to {MAX_BITS}, got {_quote(value)}")

    @property
    def label(self) -> str:
        return f"W{self.weight_bits}A{self.activation_bits}" + ("/ch" if self.per_channel else "")

    @classmethod
    def from_label(cls, label: str) -> LayerQuant | None:
        """The setting a `label` names (as run folders store them); None for "fp32"."""
        match = re.fullmatch(r"W(\d+)A(\d+)(/ch)?", label)
        if match is None:
            if label == "fp32":
                return None
            raise PtqauditError(f"not a layer setting label: {_quote(label)} (expected e.g. W4A8, W8A8/ch or fp32)")
        return cls(int(match[1]), int(match[2]), match[3] is not None)

    @property
    def granularity(self) -> str:
        return "per-channel" if self.per_channel else "per-tensor"

    def to_dict(self) -> dict:
        return {
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "granularity": self.granularity,
        }


@dataclass(frozen=True)
class KernelOptions:
    """Policy-wide settings of the integer kernels ONNX Runtime runs the quantized graph on. Both change
    which kernel runs, never the codes or scales, and both avoid the int16 saturation of ORT's u8 x s8
    kernels on x86-64 AVX2 without VNNI (kernels.py), making the products exact on every CPU:
    - weight_type "uint8": weight codes stored as code + 128 with zero point 128, so ORT runs its
      u8 x u8 kernels, which widen to int16 before multiplying (exact);
    - x64_quant_precision: ORT's session option session.x64quantprecision = "1": on CPUs whose u8 x s8
      kernels can saturate, a graph optimisation rewrites each constant int8 weight with a code outside
      -64..64 to uint8 the same way (sessions at ORT's default optimisation level, as ptqaudit makes them).
    The defaults are ORT's own (int8 weights, no session option)."""

    weight_type: str = "int8"
    x64_quant_precision: bool = False

    def __post_init__(self):
        if not isinstance(self.weight_type, str) or self.weight_type not in WEIGHT_TYPES:
            raise PtqauditError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)} (default int8), "
                                f"got {_quote(self.weight_type)}")
        if not isinstance(self.x64_quant_precision, bool):
            raise PtqauditError(f"x64_quant_precision must be true or false (default false), "
                                f"got {_quote(self.x64_quant_precision)}")

    @property
    def exact_products(self) -> bool:
        """Whether ORT's integer products are exact int32 sums on every CPU under these options."""
        return self.weight_type == "uint8" or self.x64_quant_precision

    def to_dict(self) -> dict:
        """The settings that differ from the defaults, as a policy file writes them (empty for ORT's own)."""
        default = KernelOptions()
        return {key: getattr(self, key) for key in OPTION_KEYS if getattr(self, key) != getattr(default, key)}

    @property
    def label(self) -> str:
        """The non-default settings in words, e.g. "uint8 weights"; empty for the defaults."""
        words = {"weight_type": f"{self.weight_type} weights", "x64_quant_precision": "x64 quant precision"}
        return ", ".join(words[key] for key in self.to_dict())


def _parse_options(data: dict, where: str) -> KernelOptions:
    """The policy-wide kernel options of a policy file's mapping (each key optional)."""
    try:
        return KernelOptions(**{key: data[key] for key in OPTION_KEYS if key in data})
    except PtqauditError as exc:
        raise PtqauditError(f"{where}: {exc}") from None


def _parse_setting(value, where: str, base: LayerQuant | None) -> LayerQuant | None:
    """A policy entry: "fp32", or a mapping of weight_bits / activation_bits / granularity
    merged onto `base` (the default), so a rule may change one field only."""
    if isinstance(value, str) and value.lower() == "fp32":
        return None
    if not isinstance(value, dict):
        raise PtqauditError(f"{where}: expected \"fp32\" or a mapping with keys {', '.join(SETTING_KEYS)}, got {_quote(value)}")
    unknown = sorted(set(map(str, value)) - set(SETTING_KEYS))
    if unknown:
        policy_wide = [key for key in unknown if key in OPTION_KEYS]
        hint = f" ({_names(policy_wide)}: policy-wide, a key of the file itself)" if policy_wide else ""
        raise PtqauditError(f"{where}: unknown key(s) {_names(unknown)}; allowed: {', '.join(SETTING_KEYS)}{hint}")
    merged = base.to_dict() if base else {}
    merged.update(value)
    missing = [k for k in ("weight_bits", "activation_bits") if k not in merged]
    if missing:
        raise PtqauditError(f"{where}: {' and '.join(missing)} missing (the default is fp32, so nothing to inherit)")
    granularity = merged.get("granularity", "per-tensor")
    if granularity not in GRANULARITIES:
        raise PtqauditError(f"{where}: granularity must be one of {', '.join(GRANULARITIES)}, got {_quote(granularity)}")
    try:
        return LayerQuant(merged["weight_bits"], merged["activation_bits"], granularity == "per-channel")
    except PtqauditError as exc:
        raise PtqauditError(f"{where}: {exc}") from None


def operand_bits(q: LayerQuant | None) -> tuple[int, int]:
    """(weight bits, activation bits) a setting costs in BitOPs; fp32 (None) costs 32 bits per operand."""
    return (FP32_BITS, FP32_BITS) if q is None else (q.weight_bits, q.activation_bits)


def bitops_of(macs, weight_bits, activation_bits):
    """BitOPs of `macs` multiply-accumulates at these operand widths (plain ints or NumPy arrays alike)."""
    return macs * weight_bits * activation_bits


def effective_bits_of(bitops: int, macs: int) -> float:
    """sqrt(BitOPs / MACs): the width b at which a uniform WbAb policy costs `bitops`."""
    return math.sqrt(bitops / macs)


@dataclass(frozen=True)
class Policy:
    """A policy as written: a default setting plus ordered per-layer rules (later rules win)."""

    name: str
    description: str
    default: LayerQuant | None  # None: layers are fp32 unless a rule quantizes them
    rules: tuple[tuple[str, object], ...]  # (selector, raw setting), validated against the default
    source: str
    options: KernelOptions = KernelOptions()  # policy-wide: which of ORT's integer kernels run the layers

    def _selected(self, selector: str, layers: list[Layer]) -> list[Layer]:
        # first and last among the layers that compute (an embedding lookup is neither)
        computing = [layer for layer in layers if not layer.kind.weight_only]
        if selector == "@first":
            return computing[:1]
        if selector == "@last":
            return computing[-1:]
        if selector.startswith("@"):
            kind = selector[1:]
            return [layer for layer in layers if kind == layer.kind.selector or kind in layer.kind.also_selected_by]
        return [layer for layer in layers if fnmatch.fnmatchcase(layer.name, selector)]

    def resolve(self, layers: list[Layer]) -> "ResolvedPolicy":
        """The setting of every layer of a model; a rule that matches no layer is an error, unless it selects a
        kind of layer (@embedding, @attention, ...)."""
        # the default reaches the kinds quantize_dynamic quantizes by default (not activation products)
        mapping = {layer.name: self.default if layer.kind.quantized_by_default else None for layer in layers}
        for selector, raw in self.rules:
            selected = self._selected(selector, layers)
            if not selected and selector[1:] in KINDS:
                continue  # a kind the model has none of: a policy may be written for several kinds of model
            if not selected:
                close = difflib.get_close_matches(selector, [layer.name for layer in layers], n=3, cutoff=0.3)
                hint = f"; closest layer names: {', '.join(close)}" if close else ""
                raise PtqauditError(
                    f"policy {self.name}: layer rule {_quote(selector)} matches no layer of the model{hint} "
                    "(`ptqaudit layers MODEL` lists them)"
                )
            for layer in selected:
                mapping[layer.name] = _parse_setting(raw, f"policy {self.name}, layer rule {_quote(selector)}", self.default)
        return ResolvedPolicy(self.name, mapping, self.options)


@dataclass(frozen=True)
class ResolvedPolicy:
    """A policy applied to one model: each layer (in graph order) to its setting, None for fp32, and the
    policy-wide kernel options."""

    name: str
    mapping: dict[str, LayerQuant | None]
    options: KernelOptions = KernelOptions()

    @property
    def quantized(self) -> dict[str, LayerQuant]:
        return {name: q for name, q in self.mapping.items() if q is not None}

    def bitops(self, layers: list[Layer]) -> int:
        """Sum over layers of MACs * weight bits * activation bits, per input sample (fp32 = 32 bits)."""
        return sum(bitops_of(layer.macs, *operand_bits(self.mapping[layer.name])) for layer in layers)

    def effective_bits(self, layers: list[Layer]) -> float:
        """sqrt(BitOPs / MACs): a uniform WbAb policy has b effective bits."""
        return effective_bits_of(self.bitops(layers), sum(layer.macs for layer in layers))

    def to_dict(self) -> dict:
        return {name: (q.to_dict() if q else "fp32") for name, q in self.mapping.items()}

    @property
    def digest(self) -> str:
        """Stable short hash of the per-layer settings and kernel options (not the name): equal policies,
        equal digests. Default options leave the hash as it was before options existed, so older run
        folders and caches still match."""
        content = self.to_dict()
        if self.options.to_dict():
            content = {"layers": content, "options": self.options.to_dict()}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def summary(self) -> str:
        """The settings used and how many layers each, then any kernel option, e.g. "W4A8 x18, W8A8 x2"
        or "W8A8 x4; uint8 weights"."""
        counts: dict[str, int] = {}
        for q in self.mapping.values():
            label = q.label if q else "fp32"
            counts[label] = counts.get(label, 0) + 1
        layers = ", ".join(f"{label} x{n}" for label, n in counts.items())
        return f"{layers}; {self.options.label}" if self.options.label else layers


def mitigations(policy: ResolvedPolicy) -> list[tuple[str, ResolvedPolicy]]:
    """The policy under each mitigation of the avx2-u8s8 saturation it does not already use, with what each
    changes: ORT's session option, uint8 weights, 7-bit (reduce_range) weights where it has 8."""
    variants = []
    if not policy.options.x64_quant_precision:
        variants.append(("x64 quant precision (session option)", replace(policy.options, x64_quant_precision=True)))
    if policy.options.weight_type != "uint8":
        variants.append(("uint8 weights", replace(policy.options, weight_type="uint8")))
    result = [(what, ResolvedPolicy(f"{policy.name} + {what}", policy.mapping, options)) for what, options in variants]
    if any(q is not None and q.weight_bits == 8 for q in policy.mapping.values()):
        seven = {name: q if q is None or q.weight_bits != 8 else replace(q, weight_bits=7)
                 for name, q in policy.mapping.items()}
        result.append(("7-bit weights (reduce_range)", ResolvedPolicy(f"{policy.name} + reduce_range", seven,
                                                                      policy.options)))
    return result


def parse_policy(data, name: str, source: str) -> Policy:
    if not isinstance(data, dict):
        raise PtqauditError(f"policy {name} ({source}): expected a mapping with keys {', '.join(FILE_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(FILE_KEYS))
    if unknown:
        raise PtqauditError(f"policy {name} ({source}): unknown key(s) {_names(unknown)}; allowed: {', '.join(FILE_KEYS)}")
    if "default" not in data:
        raise PtqauditError(f"policy {name} ({source}): missing key 'default' (a setting or \"fp32\")")
    default = _parse_setting(data["default"], f"policy {name}, default", None)
    rules = data.get("layers") or {}
    if not isinstance(rules, dict):
        raise PtqauditError(f"policy {name} ({source}): 'layers' must map layer names or globs to settings")
    for selector, raw in rules.items():
        if not isinstance(selector, str) or (selector.startswith("@") and selector not in SPECIAL_SELECTORS):
            raise PtqauditError(
                f"policy {name}: bad layer selector {_quote(selector)}; use a node name, a glob, or one of "
                f"{', '.join(SPECIAL_SELECTORS)}"
            )
        if len(selector) > MAX_SELECTOR_CHARS:
            raise PtqauditError(f"policy {name}: layer selector {_quote(selector)} is {len(selector):,} characters "
                                f"long; at most {MAX_SELECTOR_CHARS} (a glob can name a long layer)")
        _parse_setting(raw, f"policy {name}, layer rule {_quote(selector)}", default)  # fail early on bad values
    description = data.get("description", "")
    if not isinstance(description, str):
        raise PtqauditError(f"policy {name}: 'description' must be a string")
    options = _parse_options(data, f"policy {name} ({source})")
    return Policy(name, description, default, tuple(rules.items()), source, options)


def builtin_policy_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


class _Refused(Exception):
    """A policy file asks for something refused before it is parsed further (the message says what)."""


def _line(mark) -> str:
    return f" (line {mark.line + 1})"


def _too_deep(where: str = "") -> _Refused:
    return _Refused(f"nested deeper than {MAX_NESTING} levels{where}; a policy needs 3 (the file, 'layers', a setting)")


class _PolicyYamlLoader(yaml.SafeLoader):
    """YAML's safe loader narrowed to what a policy needs. No aliases (*name): a few hundred bytes of them
    stand for billions of values (anything that walks the value takes that long), or for a value that
    contains itself. At most MAX_NESTING levels: the composer recurses, so 100,000 levels would exhaust
    the stack. No key twice in one mapping, and no merge keys (<<): both would let a later value silently
    replace an earlier one."""

    def __init__(self, stream):
        super().__init__(stream)
        self.nesting = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"aliases (*name) are not accepted in a policy file; write the value out{_line(event.start_mark)}")
        opens = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        self.nesting += opens
        if self.nesting > MAX_NESTING:
            raise _too_deep(_line(event.start_mark))
        node = super().compose_node(parent, index)
        self.nesting -= opens
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused(f"merge keys (<<) are not accepted in a policy file{_line(key_node.start_mark)}")
            key = self.construct_object(key_node)
            if not isinstance(key, Hashable):
                continue  # unhashable: SafeLoader refuses it below, with its own message
            if key in seen:
                raise _Refused(f"key {_quote(key)} appears twice in one mapping{_line(key_node.start_mark)}; "
                               "give each key once")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _unique_keys(pairs: list[tuple]) -> dict:
    """json's object_pairs_hook: a mapping, refusing a key given twice (json would keep the last)."""
    mapping = {}
    for key, value in pairs:
        if key in mapping:
            raise _Refused(f"key {_quote(key)} appears twice in one object; give each key once")
        mapping[key] = value
    return mapping


def _check_nesting(data) -> None:
    """Refuse collections nested deeper than MAX_NESTING (walked without recursion)."""
    stack = [(data, 1)]  # (a value, its level if it is a collection)
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            if level > MAX_NESTING:
                raise _too_deep()
            stack.extend((child, level + 1) for child in (value.values() if isinstance(value, dict) else value))


def _parse_file(text: str, is_json: bool):
    """The data of a policy file's text; _Refused or the parser's own error when it is refused."""
    if not is_json:
        return yaml.load(text, Loader=_PolicyYamlLoader)
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:  # json's decoder recurses, up to Python's recursion limit
        raise _too_deep() from None
    _check_nesting(data)
    return data


def load_policy(spec: str) -> Policy:
    """A built-in policy by name (see `ptqaudit policies`) or a JSON / YAML policy file by path."""
    path = Path(spec)
    if not path.is_file():
        builtin = BUILTIN_DIR / f"{spec}.yaml"
        if builtin.is_file():
            path = builtin
        else:
            raise PtqauditError(
                f"policy {_quote(spec)} is neither a file nor a built-in policy; built-ins: {', '.join(builtin_policy_names())}"
            )
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)  # no more than the limit, whatever the file's size
        if len(raw) > MAX_FILE_BYTES:
            raise PtqauditError(f"policy file {path} is larger than {MAX_FILE_BYTES // 1024} KiB, the most a policy file "
                                "may be (one naming 2,000 layers takes about 230 KiB)")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PtqauditError(f"cannot read policy file {path}: {exc}") from exc
    is_json = path.suffix.lower() == ".json"
    try:
        data = _parse_file(text, is_json)
    except _Refused as exc:
        raise PtqauditError(f"policy file {path}: {exc}") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: json's errors, and numbers or dates out of range
        if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
            problem = _cut(exc.problem) + (_line(exc.problem_mark) if exc.problem_mark else "")
        else:
            problem = _cut(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise PtqauditError(f"policy file {path} is not valid {'JSON' if is_json else 'YAML'}: {problem}") from exc
    source = "built-in" if path.parent == BUILTIN_DIR else str(path)
    return parse_policy(data, path.stem, source)


def policy_file_dict(resolved: ResolvedPolicy, description: str) -> dict:
    """A resolved policy written out as an explicit policy file (every layer named, then its kernel options)."""
    return {"description": description, "default": "fp32", "layers": resolved.to_dict(), **resolved.options.to_dict()}
