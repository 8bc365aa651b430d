"""The `ptqaudit` command line: each command parses options, calls the library and prints results."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import time
import traceback
from pathlib import Path

import click

from . import __version__, progress
from .analysis import AnalysisSettings, analyse, cached_analysis, load_run
from .data import DataConfig, load_dataset
from .text_data import PADDINGS, TextConfig
from .distill import (AUTO_HARDENING_POINTS, BALANCE_EVERY, CANDIDATES, HARDENINGS, MODE_DEFAULTS, MODES, QUANT_TARGETS,
                      SCHEDULES, DistillConfig, run_distill)
from .errors import GateFailed, PtqauditError
from .evaluate import DEVICES, ENGINES, EvalReport, evaluate, table_line
from .kernels import KERNEL_FAMILIES, parse_kernels
from .onnx_graph import load_model
from .policy import builtin_policy_names, load_policy
from .quantize import quantize
from .gate import Gate
from .report import FORMATS, build, plots, render, report_inputs
from .runs import write_atomic
from .search.methods import METHODS
from .search.run import SIM_DEVICES, SearchConfig, load_search_inputs, run_search
from .search.sensitivity import SENSITIVITY_METHODS
from .search.space import OBJECTIVES, Objective
from .text import table
from .workers import EXECUTORS, WorkerSettings

EXIT_INTERNAL_ERROR = 3  # a bug in ptqaudit, kept apart from 1 (gate failed) and 2 (bad input)


def _comma_list(convert, example: str):
    """A click callback parsing "a,b,c" into a tuple of `convert` values (None stays None)."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(convert(v) for v in value.split(","))
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list such as {example}, got {value!r}") from None

    return parse


def debug_option(f):
    return click.option("--debug", is_flag=True, expose_value=False, help="Show the full traceback on errors.")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout instead of tables.")(f)


def progress_option(f):
    return click.option("--no-progress", is_flag=True, help="Hide progress: the bars on a terminal, and elsewhere (CI "
                        "logs) the lines printed every 30 s ($PTQAUDIT_PROGRESS_PERIOD seconds).")(f)


def force_option(f):
    return click.option("--force", is_flag=True, help="Write the output even when it is one of the files this "
                        "command reads (refused otherwise, as that would destroy an input).")(f)


def _refuse_overwriting_inputs(output: str | Path, inputs, force: bool) -> None:
    """Bad input when `output` is an existing file this command reads (writing it would destroy that
    input), unless --force. Paths are compared as files (symlinks, ./a and a, hard links), not as text."""
    if force or not os.path.isfile(output):
        return
    for path in inputs:
        if os.path.isfile(path) and os.path.samefile(output, path):
            raise PtqauditError(f"the output {output} is the input {path}: writing it would destroy it; "
                                "choose another output path, or pass --force")


def model_argument(f):
    return click.argument("model", type=click.Path(dir_okay=False, path_type=str))(f)


def data_options(f):
    """Options selecting the evaluation data, shared by every command that runs a model; the command
    receives them parsed into one DataConfig, as `data_config`."""
    options = [
        click.option("--data", default=DataConfig.name, show_default=True,
                     help="digits (embedded 8x8 digits, no download), cifar10 (the standard cifar-10-batches-py "
                          "folder), a folder of class sub-folders of PNG/JPEG images, or an .npz with x and y; for "
                          "text models: sst2 (GLUE's SST-2 folder, its dev.tsv as the test split), a .tsv, .csv or "
                          ".jsonl file of sentences and labels, or an .npz of token arrays named as the model's "
                          "inputs plus y."),
        click.option("--data-root", default=None, help="cifar10: where to look for its folder first (then "
                     "$PTQAUDIT_DATA, then ~/.cache/ptqaudit); sst2: the SST-2 folder (train.tsv, dev.tsv)."),
        click.option("--download", is_flag=True, help="cifar10: fetch the official archive (checksum-verified) when missing."),
        click.option("--split", type=click.Choice(["test", "train"]), default=DataConfig.split, show_default=True),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Use a deterministic, class-balanced subset of N examples."),
        click.option("--mean", callback=_comma_list(float, "0.49,0.48,0.45"), default=None, help="Per-channel mean to subtract after scaling pixels to [0,1], e.g. 0.49,0.48,0.45."),
        click.option("--std", callback=_comma_list(float, "0.49,0.48,0.45"), default=None, help="Per-channel standard deviation to divide by, after --mean."),
        click.option("--tokenizer", type=click.Path(dir_okay=False), default=None,
                     help="Text data: the model's Hugging Face tokenizer.json."),
        click.option("--max-length", type=click.IntRange(min=1), default=TextConfig.max_length, show_default=True,
                     help="Text data: truncate sentences to this many tokens (special tokens included)."),
        click.option("--padding", type=click.Choice(PADDINGS), default=TextConfig.padding, show_default=True,
                     help="Text data: pad each batch to its longest sentence (as Hugging Face pipelines do), or "
                          "every sentence to --max-length (fixed-shape deployments). Padded positions enter the "
                          "activation ranges dynamic quantization measures, so this is part of the scenario."),
        click.option("--text-column", default=None, help="Text files: the column of sentences (default: sentence, "
                     "else text)."),
        click.option("--label-column", default=TextConfig.label_column, show_default=True,
                     help="Text files: the column of class indices."),
    ]

    def parse(data, data_root, download, split, limit, mean, std, tokenizer, max_length, padding, text_column,
              label_column) -> DataConfig:
        text = TextConfig(tokenizer=tokenizer, max_length=max_length, padding=padding, text_column=text_column,
                          label_column=label_column)
        return DataConfig(name=data, root=data_root, split=split, limit=limit, mean=mean, std=std, download=download,
                          text=text)

    return _option_group(f, options, parse, "data_config")


def _option_group(f, options: list, parse, into: str):
    """Add `options` to command f, which receives their values parsed into one object, parse(**values), as
    its argument `into` (the parameters of parse name the options' values)."""
    names = list(inspect.signature(parse).parameters)

    @functools.wraps(f)
    def command(*args, **kwargs):
        return f(*args, **{into: parse(**{name: kwargs.pop(name) for name in names})}, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def _default_run_folder(kind: str, model: str) -> str:
    return f"runs/{kind}-{Path(model).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def worker_options(f):
    """Where the independent evaluations run, parsed into one WorkerSettings, as `worker_settings`."""
    options = [
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Independent evaluations run at once (ORT's, and the search's groups of policies scored by "
                          "the simulator), each in a worker process with an equal share of the cores; results are the "
                          "same for any number of workers. 0: one per available core, started when the work would take "
                          "more than a few seconds in one process."),
        click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
                     help="local: worker processes on this machine; ray: tasks on a Ray cluster (pip install "
                          "'ptqaudit[ray]'), the model and data shipped to its nodes once."),
        click.option("--ray-address", default="", help="The Ray cluster to use with --executor ray (e.g. "
                     "ray://head:10001, or auto for the one `ray start` runs here) [default: a Ray instance started on "
                     "this machine for the run]."),
    ]

    def parse(workers, executor, ray_address) -> WorkerSettings:
        settings = WorkerSettings(workers=workers, executor=executor, ray_address=ray_address)
        settings.validate()
        return settings

    return _option_group(f, options, parse, "worker_settings")


def optimize_option(f):
    """--optimize: fuse a transformer with ONNX Runtime's transformer optimizer before auditing it."""
    return click.option("--optimize", default="", metavar="MODEL_TYPE",
                        help="Run ONNX Runtime's transformer optimizer (onnxruntime.transformers.optimizer) for this "
                             "model type first, e.g. bert (BERT, DistilBERT, RoBERTa, MiniLM exports), gpt2, bart, t5, "
                             "vit; as ORT's documentation advises before dynamic quantization. Its fused Attention and "
                             "EmbedLayerNormalization become layers (@fused-attention, @fused-embedding). Default: "
                             "audit the model as given.")(f)


def input_shape_option(f):
    """--input-shape, for commands that describe a model without data to take the shape from."""
    return click.option("--input-shape", callback=_comma_list(_positive_int, "3,32,32"), default=None,
                        help="One input's shape without the batch, e.g. 3,32,32, or a text model's sequence length, "
                             "e.g. 128: fills the dims the model's input leaves symbolic (such as H and W), on which "
                             "layer shapes and MACs depend.")(f)


def _parse_kernels(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_kernels(value)
    except PtqauditError as error:
        raise click.BadParameter(str(error).removeprefix("--kernels: ")) from None


def kernels_option(default: str | None, what: str):
    """--kernels: the fleet of kernel families numbers are given for."""
    return click.option(
        "--kernels", callback=_parse_kernels, default=default, show_default=default is not None,
        help=f"Kernel families of the CPUs the model will run on (a fleet), {what}: a comma list of "
             f"{', '.join(KERNEL_FAMILIES)}; 'auto' is this machine's, 'all' every family. This machine's family is "
             "measured on ORT's own kernels, the others by the simulator's exact emulation of their integer "
             "arithmetic, labelled 'emulated'. The gate holds the worst family to its thresholds.")


def gate_options(f):
    """The release gate on the worst case, shared by search and report."""
    f = click.option("--min-accuracy", type=click.FloatRange(min=0, max=100), default=None,
                     help="Gate: exit 1 when the worst-case accuracy (percent) is below A.")(f)
    return click.option("--max-drop", type=click.FloatRange(min=0), default=None,
                        help="Gate: exit 1 when the worst-case drop from FP32 (points) exceeds D.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="ptqaudit")
@debug_option
def cli():
    """Audit how much ONNX Runtime dynamic post-training quantization can hurt a classifier.

    Exit codes: 0 ok, 1 the gate failed, 2 bad input or usage, 3 internal error.

    Example (the audit: search the worst and best policies, then report with a release gate):

    \b
      ptqaudit search sample_models/digits_cnn.onnx -o runs/digits-audit
      ptqaudit report runs/digits-audit --format html --max-drop 2
    """


def _print_json(value) -> None:
    click.echo(json.dumps(value, indent=2))


@cli.command()
@model_argument
@input_shape_option
@optimize_option
@json_option
@debug_option
def layers(model, input_shape, optimize, as_json):
    """List the quantizable layers of MODEL with their kind, shapes, MACs per input and parameter counts.
    Policies name layers by these ONNX node names, or a whole kind by its selector (@kind).

    Kinds: Conv, MatMul and Gemm with a constant weight; embedding (a Gather on a constant table: its table
    is quantized, it costs no MACs); attention (a MatMul of two activations, as in attention scores and
    context: float unless a policy rule selects it, as quantize_dynamic leaves it by default); lstm (an LSTM
    with constant weights: its weight width is W's and R's, its activation width X's and the hidden state's);
    in a model fused by ORT's transformer optimizer (--optimize), fused-attention (an Attention node: its Q, K, V
    projection is quantized) and fused-embedding (an EmbedLayerNormalization: its tables, gamma and beta are;
    @embedding selects it too). A text model's MACs depend on the sequence length: give it as --input-shape L
    (a length, e.g. 128).

    Example:

    \b
      ptqaudit layers sample_models/digits_cnn.onnx
      ptqaudit layers sample_models/sst2_bert.onnx --input-shape 64
      ptqaudit layers sample_models/sst2_bert.onnx --input-shape 64 --optimize bert
    """
    loaded = load_model(model, input_shape, optimize)
    at_length = f" at sequence length {loaded.sequence_length}" if loaded.is_text else ""
    if as_json:
        _print_json({"model": model, "total_macs": loaded.total_macs,
                     **({"sequence_length": loaded.sequence_length} if loaded.is_text else {}), "layers": [
            {"index": l.index, "name": l.name, "op_type": l.op_type, "kind": l.kind.selector,
             "weight_shape": list(l.weight_shape), "output_shape": list(l.output_shape), "macs": l.macs,
             "params": l.params} for l in loaded.layers]})
        return
    rows = [[l.index, l.name, f"@{l.kind.selector}", "x".join(map(str, l.weight_shape)) if l.weight_name else
             f"activation {'x'.join(map(str, l.weight_shape))}", "x".join(map(str, l.output_shape)),
             f"{l.macs:,}", f"{l.params:,}"] for l in loaded.layers]
    click.echo(table(["#", "layer", "kind", "weight", "output", "MACs", "params"], rows, right={0, 5, 6}))
    fused = f", as ORT's transformer optimizer fuses it for {optimize}" if optimize else ""
    click.echo(f"\n{len(loaded.layers)} quantizable layers, {loaded.total_macs:,} MACs per input{at_length}{fused}")
    if loaded.unaudited_note:
        click.echo(loaded.unaudited_note)


@cli.command()
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="Also show each policy's cost (effective bits) on this model.")
@input_shape_option
@optimize_option
@json_option
@debug_option
def policies(model_path, input_shape, optimize, as_json):
    """List the built-in policies. A policy file of your own (YAML or JSON) has the same form:

    \b
      description: "W4A8 except the first layer"
      default: {weight_bits: 4, activation_bits: 8, granularity: per-tensor}
      layers:                       # optional; later rules win
        "/conv1/Conv": fp32         # a node name, a glob such as "/layer3/*",
        "@last": {weight_bits: 8}   # or @first, @last, @Conv, @MatMul, @Gemm
      weight_type: int8             # optional: uint8 runs ORT's exact u8 x u8 kernels
      x64_quant_precision: false    # optional: ORT's session.x64quantprecision option

    Bits run from 2 to 8; granularity is per-tensor or per-channel (weights). The last two keys avoid the
    int16 saturation of ORT's u8 x s8 kernels on x86-64 AVX2 without VNNI (see the README).

    Example:

    \b
      ptqaudit policies --model sample_models/digits_cnn.onnx
    """
    loaded = load_model(model_path, input_shape, optimize) if model_path else None
    entries = []
    for name in builtin_policy_names():
        policy = load_policy(name)
        entry = {"name": name, "description": policy.description}
        if loaded:
            resolved = policy.resolve(loaded.layers)
            entry.update(effective_bits=resolved.effective_bits(loaded.layers), layers=resolved.summary())
        entries.append(entry)
    if as_json:
        _print_json(entries)
        return
    headers = ["policy", "description"] + (["eff. bits", "layers"] if loaded else [])
    rows = [[e["name"], e["description"]] + ([f"{e['effective_bits']:.2f}", e["layers"]] if loaded else []) for e in entries]
    click.echo(table(headers, rows))


@cli.command(name="quantize")
@model_argument
@click.option("--policy", "-p", required=True, help="A built-in policy name (see `ptqaudit policies`) or a policy file.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Where to write the quantized ONNX model.")
@force_option
@input_shape_option
@optimize_option
@json_option
@debug_option
def quantize_command(model, policy, output, force, input_shape, optimize, as_json):
    """Write the dynamically quantized MODEL that ONNX Runtime runs for a policy: onnxruntime's own
    quantize_dynamic where it can express the policy, otherwise the same integer graph (ConvInteger /
    MatMulInteger, activations quantized per input from their measured range) at the policy's bits.
    The output may not be the model or the policy file (unless --force).

    Example:

    \b
      ptqaudit quantize sample_models/digits_cnn.onnx --policy w4a8 -o digits_w4a8.onnx
    """
    _refuse_overwriting_inputs(output, [model, policy], force)
    loaded = load_model(model, input_shape, optimize)
    chosen = load_policy(policy)
    resolved = chosen.resolve(loaded.layers)
    quantized = quantize(loaded, resolved)
    quantized.save(output)
    info = {"output": output, "policy": chosen.name, "method": quantized.method, "layers": resolved.summary(),
            "effective_bits": resolved.effective_bits(loaded.layers), "bitops": resolved.bitops(loaded.layers),
            "bytes": os.path.getsize(output)}
    if quantized.session_config:
        info["session_config"] = quantized.session_config
    if as_json:
        _print_json(info)
    else:
        click.echo(f"wrote {output} ({info['bytes'] / 1024:.0f} KiB) with {quantized.method}: policy {chosen.name}, "
                   f"{info['layers']}, {info['effective_bits']:.2f} effective bits")
        for key, value in quantized.session_config.items():
            click.echo(f'run it with the ONNX Runtime session config entry {key} = "{value}" (the policy asks for it; '
                       "a model file cannot carry it)")


@cli.command(name="eval")
@model_argument
@data_options
@click.option("--policy", "-p", "policy_specs", multiple=True,
              help="Policy to evaluate (built-in name or file); repeat for several. Default: every built-in policy.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=1, show_default=True,
              help="Inputs per ONNX Runtime call. Part of the deployment scenario: the dynamic activation range "
                   "is measured over the whole batch.")
@click.option("--device", type=click.Choice(sorted(DEVICES)), default="cpu", show_default=True,
              help="cuda needs the onnxruntime-gpu extra; integer kernels without CUDA versions stay on the CPU.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="ONNX Runtime intra-op threads (0: its default).")
@click.option("--engine", type=click.Choice(ENGINES), default="ort", show_default=True,
              help="ort: ONNX Runtime's integer kernels. sim: the PyTorch simulator (fast; for exploration). "
                   "both: ORT's numbers plus the simulator's top-1 agreement with them and its speed.")
@kernels_option("auto", "each policy measured under each")
@optimize_option
@progress_option
@gate_options
@json_option
@debug_option
def eval_command(model, data_config, policy_specs, batch_size, engine, device, threads, kernels, optimize, no_progress,
                 max_drop, min_accuracy, as_json):
    """Measure MODEL's FP32 accuracy and, for each policy, the accuracy of its dynamically quantized
    graph on ONNX Runtime's integer kernels: drop in points, top-1 agreement with FP32, cost and speed.
    With --max-drop / --min-accuracy it gates every policy under every kernel family: exit 1, naming
    each one that breaks a threshold.

    Examples:

    \b
      ptqaudit eval sample_models/cifar10_cnn.onnx --data cifar10 --data-root DIR -b 250 -p w8a8 -p w4a8
      ptqaudit eval sample_models/digits_cnn.onnx -p w8a8 --kernels all --max-drop 1
    """
    chosen = [load_policy(spec) for spec in (policy_specs or builtin_policy_names())]
    dataset = load_dataset(data_config)
    loaded = load_model(model, dataset.x.shape[1:], optimize)  # the data gives the dims a model may leave symbolic
    width = max(len(p.name) for p in chosen + [load_policy("w8a8")])
    printed = 0

    def print_new_rows(report: EvalReport) -> None:
        nonlocal printed
        columns, rows = report.columns(), report.rows()
        if not printed:
            click.echo(table_line([name for name, _ in columns] + ["built by"], columns, width))
            click.echo(table_line(["-" * width] + ["-" * w for _, w in columns[1:]] + ["-" * 8], columns, width))
        for row in rows[printed:]:
            click.echo(table_line(row, columns, width))
        printed = len(rows)

    if not as_json:
        source = {"ort": "ONNX Runtime", "sim": "the simulator (not ORT)", "both": "ONNX Runtime, simulator checked"}[engine]
        fused = f" (fused for {optimize} by ORT's transformer optimizer)" if optimize else ""
        click.echo(f"model {model}{fused} | data {dataset.name}, {len(dataset)} {dataset.unit} | "
                   f"{dataset.padding_note}batch size {batch_size} | "
                   f"numbers from {source}" + (f"\n{loaded.unaudited_note}" if loaded.unaudited_note else "") + "\n")
    report = evaluate(loaded, dataset, chosen, batch_size=batch_size, engine=engine, device=device, threads=threads,
                      progress=not no_progress, on_update=None if as_json else print_new_rows, kernels=kernels)
    if as_json:
        _print_json(report.to_dict())
    else:
        click.echo(f"\n{report.runtime}, device {report.device}; drop = FP32 accuracy - policy accuracy, in points")
        if report.shows_kernels:
            click.echo("emulated: the simulator's exact emulation of that family's integer arithmetic (ORT's own "
                       "kernels measure only this machine's family)")
    gate = Gate(max_drop, min_accuracy)
    if gate.is_set:
        checks = report.gate(gate)
        if not as_json:
            click.echo(f"gate passed: {len(checks)} checks ({len(report.results)} policy and kernel-family results)")


def search_options(f):
    """The search's settings, parsed into the keyword arguments of SearchConfig (its defaults shown), as
    `search_settings`."""
    options = [
        click.option("--bits", callback=_comma_list(int, "2,4,8"), default=",".join(map(str, SearchConfig.bits)), show_default=True,
                     help="Bit-widths each layer's weights and activations may take."),
        click.option("--budget-avg-bits", type=click.FloatRange(min=1, max=32), default=None,
                     help="Budget in effective bits, sqrt(BitOPs / MACs) [default: 6]. The worst case is searched at or "
                          "above it, the best case at or below it."),
        click.option("--budget-bitops", type=click.IntRange(min=1), default=None, help="Budget as absolute BitOPs per input instead."),
        click.option("--objective", type=click.Choice([*map(str, OBJECTIVES), "both"]), default=SearchConfig.objective, show_default=True,
                     help="Search the worst case, the best (robust) case, or both: their spread is the audit's headline."),
        click.option("--method", type=click.Choice(METHODS), default=SearchConfig.method, show_default=True,
                     help="rl: policy-gradient agent; random; greedy (one step at a time); exhaustive (small spaces)."),
        click.option("--max-evaluations", type=click.IntRange(min=1), default=SearchConfig.max_evaluations, show_default=True,
                     help="Distinct policies the search may score with the simulator, per objective: a hard cap, the "
                          "uniform policies scored first and --sensitivity probes included (exhaustive refuses a space "
                          "that admits more)."),
        click.option("--sensitivity", type=click.Choice(SENSITIVITY_METHODS), default=SearchConfig.sensitivity,
                     show_default=True,
                     help="How the RL search ranks operands before its first step: gradient (one backward pass of the "
                          "simulator over 256 images, no policy evaluations, any depth); probes (each operand alone at "
                          "the lowest width: 2 evaluations per layer, counted in --max-evaluations)."),
        click.option("--base-policy", default=SearchConfig.base_policy, show_default=True,
                     help="Policy giving each layer's weight granularity; its fp32 layers stay fp32."),
        click.option("--layers", multiple=True, help="Search only these layers (name or glob, repeatable); "
                     "the others keep the base policy's setting."),
        click.option("--batch-size", "-b", type=click.IntRange(min=1), default=SearchConfig.batch_size, show_default=True,
                     help="Deployment batch size: the activation range is measured over the whole batch."),
        click.option("--search-limit", type=click.IntRange(min=1), default=SearchConfig.search_limit, show_default=True,
                     help="Images (a class-balanced subset of the evaluation data) the simulator scores policies on."),
        click.option("--search-split", type=click.Choice(["test", "train"]), default=None,
                     help="Score candidates on this split of the data instead of the evaluation data, so the ORT numbers "
                          "reported come from images the search never saw [default: the evaluation data]."),
        click.option("--verify-top", type=click.IntRange(min=1), default=SearchConfig.verify_top, show_default=True,
                     help="Leading candidates per objective measured on ONNX Runtime over the whole evaluation data."),
        click.option("--dynamic", is_flag=True, help="Also audit an input-conditioned policy: a router that sends each input "
                     "(or each batch, when --batch-size > 1) to one of the verified candidates, run on ORT by routing."),
        click.option("--seed", type=int, default=SearchConfig.seed, show_default=True, help="Fixes every random choice of the search."),
        click.option("--device", type=click.Choice(SIM_DEVICES), default=SearchConfig.device, show_default=True,
                     help="Where the simulator scores policies: cuda runs it on a GPU (a CUDA build of torch). ORT's "
                          "numbers still come from this CPU's integer kernels (or the fleet's emulation)."),
        kernels_option("auto", "a policy scored by its lowest accuracy over them (the simulator's time grows with "
                               "each family)"),
    ]

    def parse(bits, budget_avg_bits, budget_bitops, objective, method, max_evaluations, sensitivity, base_policy, layers,
              batch_size, search_limit, search_split, verify_top, dynamic, seed, device, kernels) -> dict:
        if budget_avg_bits is None and budget_bitops is None:
            budget_avg_bits = SearchConfig.budget_avg_bits
        return dict(bits=bits, budget_avg_bits=budget_avg_bits, budget_bitops=budget_bitops, objective=objective,
                    method=method, max_evaluations=max_evaluations, sensitivity=sensitivity, base_policy=base_policy,
                    layers=layers,
                    batch_size=batch_size, search_limit=search_limit, search_split=search_split, verify_top=verify_top,
                    dynamic=dynamic, seed=seed, device=device, kernels=kernels)

    return _option_group(f, options, parse, "search_settings")


@cli.command(name="search")
@model_argument
@data_options
@search_options
@click.option("--output", "-o", default=None, help="Run folder [default: runs/search-<model>-<time>].")
@click.option("--resume", is_flag=True, help="Continue the run in --output, replaying what its trace holds.")
@optimize_option
@worker_options
@progress_option
@gate_options
@json_option
@debug_option
def search_command(model, data_config, search_settings, output, resume, optimize, worker_settings, no_progress, max_drop,
                   min_accuracy, as_json):
    """Find the worst and best bit-width policies for MODEL within a budget (static ones, and with
    --dynamic an input-conditioned one): the simulator scores candidates on a subset of the data, ONNX
    Runtime measures the leading ones on all of it. Writes the run folder (run.json, trace.jsonl,
    worst.yaml, best.yaml, summary.json).

    Example:

    \b
      ptqaudit search sample_models/digits_cnn.onnx --budget-avg-bits 6 -o runs/digits-audit --max-drop 2
    """
    gate = Gate(max_drop, min_accuracy)
    if gate.is_set and search_settings["objective"] == Objective.BEST:
        raise PtqauditError("--max-drop / --min-accuracy gate the worst case: search with --objective worst or both")
    if output is None:
        if resume:
            raise PtqauditError("--resume needs --output, the run folder to continue")
        output = _default_run_folder("search", model)
    config = SearchConfig(model=model, data=data_config, output=output, optimize=optimize, **search_settings)
    loaded, dataset, search_data = load_search_inputs(config)
    echo = functools.partial(progress.write, err=as_json)
    try:
        summary = run_search(config, loaded, dataset, resume=resume, progress=not no_progress, echo=echo,
                             search_data=search_data, workers=worker_settings)
    except KeyboardInterrupt:
        click.echo(f"ptqaudit: interrupted; {output} keeps every finished evaluation: continue with "
                   f"`ptqaudit search ... -o {output} --resume`", err=True)
        sys.exit(130)
    if as_json:
        _print_json(summary.to_dict())
    else:
        click.echo("\n" + summary.table())
        click.echo(f"policies and details in {output}/ (worst.yaml, best.yaml, summary.json)")
    if gate.is_set:  # without a gate there may be no worst case to read (--objective best)
        checks = gate.enforce(summary.fp32_accuracy, summary.worst.accuracy)
        if not as_json:
            click.echo("gate passed: " + "; ".join(c.name for c in checks))


@cli.command(name="report")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="md (Markdown, plots as PNG files in RUN_DIR/plots/), html (one self-contained file, plots "
                   "embedded), json (for other tools), junit (the gate as JUnit XML test cases, for CI systems) "
                   "[default: md].")
@click.option("--output", "-o", default=None, help="Where to write the report; - for standard output "
              "[default: standard output; for html, RUN_DIR/report.html]. Never one of the files the report "
              "reads (the run's files, the model) unless --force.")
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (--format json -o -).")
@gate_options
@click.option("--model", "model_path", default=None,
              help="The model file, when the path stored in RUN_DIR/run.json does not resolve from here.")
@click.option("--analysis-limit", type=click.IntRange(min=1), default=AnalysisSettings.limit, show_default=True,
              help="Images (a class-balanced subset of the run's evaluation data) the vulnerability analysis measures.")
@click.option("--ship-policy", default=AnalysisSettings.ship_policy, show_default=True,
              help="The policy the team ships (built-in name or file), measured first: per kernel family on the "
                   "whole evaluation data, then per batch size and under the corruptions. w8a8 is quantize_dynamic's "
                   "default.")
@kernels_option(None, "the run's fleet by default; a family the run did not measure is measured here")
@click.option("--no-analysis", is_flag=True, help="Only the headline and gate, from the run's summary (no ORT work, "
              "unless --kernels names a family the run did not measure).")
@click.option("--recompute", is_flag=True, help="Measure the analysis again even if RUN_DIR holds one made the same way.")
@worker_options
@progress_option
@debug_option
def report_command(run_dir, fmt, output, force, as_json, max_drop, min_accuracy, model_path, analysis_limit,
                   ship_policy, kernels, no_analysis, recompute, worker_settings, no_progress):
    """Report on a `search` (or `distill`) run folder. First the policy the team ships (--ship-policy) per
    kernel family, batch size and corruption; then the budget search's headline (FP32, best and worst case
    within the budget per kernel family, the drop, batch size, budget, engine agreement, verdict); then
    the vulnerability analysis measured on ONNX Runtime (per-layer sensitivity and low-bit frequency,
    flipped inputs and per-class drops, batch size and composition, common corruptions, accuracy versus
    budget; cached in RUN_DIR/analysis.json) and plots. With --max-drop / --min-accuracy it is a release
    gate on the worst case, the fleet's lowest: exit 1, with one line naming the failing figure (the
    report is still written). The output may not be a file the report reads (unless --force).

    Examples:

    \b
      ptqaudit report runs/digits-audit --format junit -o gate.xml --max-drop 2
      ptqaudit report runs/digits-audit --kernels all --ship-policy w8a8-per-channel
    """
    if as_json:
        if fmt not in (None, "json") or output not in (None, "-"):
            raise PtqauditError("--json prints the JSON report on standard output: drop --format/-o, or write a file "
                                "with --format json -o FILE")
        fmt, output = "json", "-"
    fmt = fmt or "md"
    if output is None and fmt == "html":
        output = str(Path(run_dir) / "report.html")
    target = None if output in (None, "-") else Path(output)
    run = load_run(run_dir, model_path)
    if target is not None:
        _refuse_overwriting_inputs(output, report_inputs(run_dir, run), force)
    gate = Gate(max_drop, min_accuracy)
    analysis = None
    if not no_analysis:
        settings = AnalysisSettings(limit=analysis_limit, ship_policy=ship_policy, kernels=kernels or ())
        analysis = None if recompute else cached_analysis(run, settings)
        if analysis is None:
            analysis = analyse(run, settings, progress=not no_progress, echo=functools.partial(progress.write, err=True),
                               workers=worker_settings)
    report = build(run, gate, analysis, kernels, progress=not no_progress)
    figures = plots(report)
    plot_dir = run.path / "plots"
    for name, png in figures.items():
        write_atomic(plot_dir / f"{name}.png", png)
    text = render(report, fmt, figures, plot_dir, target)
    if target is None:
        click.echo(text, nl=False)
    else:
        write_atomic(target, text)
        click.echo(f"{fmt} report written to {target}", err=True)
    gate.enforce(report.headline.fp32_accuracy, report.headline.worst_accuracy)


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def distill_options(f):
    """The distillation's settings, parsed into the keyword arguments of DistillConfig (its defaults shown),
    as `distill_settings`."""
    options = [
        click.option("--mode", type=click.Choice(MODES), required=True,
                     help="detrimental: the quantized loss is maximised (a student that collapses under its policy); "
                          "robust: minimised against the worst policy the agent finds."),
        click.option("--bits", callback=_comma_list(int, "4,8"), default=",".join(map(str, DistillConfig.bits)), show_default=True,
                     help="Bit-widths each layer's weights and activations may take."),
        click.option("--budget-avg-bits", type=click.FloatRange(min=1, max=32), default=DistillConfig.budget_avg_bits,
                     show_default=True, help="Budget in effective bits, sqrt(BitOPs / MACs); the agent's policies are at or above it."),
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="Passes over the training images; the agent takes its turn before each and after the last "
                          f"[default: detrimental {MODE_DEFAULTS['detrimental']['epochs']}, "
                          f"robust {MODE_DEFAULTS['robust']['epochs']}]."),
        click.option("--train-limit", type=click.IntRange(min=0), default=DistillConfig.train_limit, show_default=True,
                     help="Train on a class-balanced subset of N images of the train split; 0: all of it."),
        click.option("--train-batch-size", type=click.IntRange(min=1), default=DistillConfig.train_batch_size, show_default=True),
        click.option("--min-epoch-batches", type=click.IntRange(min=1), default=DistillConfig.min_epoch_batches,
                     show_default=True, help="An epoch passes over the training images again (in a new order) until "
                     "it has this many batches: a small train split still gets enough optimizer steps."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Peak Adam learning rate of the student (--lr-schedule says how it moves over the run) "
                          "[default: auto, from the teacher's depth and weight scale]."),
        click.option("--lr-schedule", type=click.Choice(SCHEDULES), default=DistillConfig.lr_schedule, show_default=True,
                     help="cosine: the rate decays from --lr to 0 over the run; constant: --lr throughout."),
        click.option("--quant-weight", type=click.FloatRange(min=0), default=DistillConfig.quant_weight, show_default=True,
                     help="Weight of the quantized-loss term against the distillation term."),
        click.option("--balance", type=click.FloatRange(min=0), default=None,
                     metavar="POINTS", help="Double the distillation term's weight whenever the student's fp32 "
                     "accuracy on the held-out images falls more than POINTS below the teacher's, and halve it again "
                     f"(not below 1) once the gap is under POINTS / 2 (checked every {BALANCE_EVERY} batches and after "
                     f"each epoch); 0: keep it at 1 [default: detrimental {MODE_DEFAULTS['detrimental']['balance']:g}, "
                     f"robust {MODE_DEFAULTS['robust']['balance']:g}]."),
        click.option("--policies-per-batch", type=click.IntRange(1, CANDIDATES), default=None,
                     help="Quantized passes per training batch. robust: under the ones of the batch's "
                          f"{CANDIDATES} candidate policies the student does worst under; detrimental: candidates "
                          f"in turn [default: robust {MODE_DEFAULTS['robust']['policies_per_batch']}, "
                          f"detrimental {MODE_DEFAULTS['detrimental']['policies_per_batch']}]."),
        click.option("--refresh/--no-refresh", default=None,
                     help="Each agent turn also runs a fresh RL search of --audit-evaluations policies from the "
                          "student's own sensitivity, as the audit will, and its leaders join the training "
                          "policies; the turn after the last epoch runs it either way [default: robust "
                          f"{_on_off(MODE_DEFAULTS['robust']['refresh'])}, detrimental "
                          f"{_on_off(MODE_DEFAULTS['detrimental']['refresh'])}]."),
        click.option("--equalize/--no-equalize", default=DistillConfig.equalize, show_default=True,
                     help="Start the student from the teacher's weights after cross-layer equalization: layers "
                          "joined only by ReLU or pooling are rescaled per channel so that their weight ranges even "
                          "out (the same function; per-tensor low-bit weights lose less)."),
        click.option("--kure", type=click.FloatRange(min=0), default=DistillConfig.kure, show_default=True,
                     help="Weight of the kurtosis regulariser (KURE) pulling each searched layer's weights toward "
                          "a uniform distribution, easier to quantize at few bits; 0: off."),
        click.option("--range-reg", type=click.FloatRange(min=0), default=DistillConfig.range_reg, show_default=True,
                     help="Weight of the range regulariser: the mean log ratio of each searched layer's squared "
                          "weight range and of each input's squared per-sample span to their mean squares, the "
                          "ratio that sets a min-max quantizer's noise against the signal; 0: off."),
        click.option("--range-gradient/--no-range-gradient", default=DistillConfig.range_gradient, show_default=True,
                     help="The quantized passes' scales pass a gradient to the min-max ranges they are measured "
                          "from, so training can also shrink the extreme weights and activations that set a few-bit "
                          "step (the forward pass, and so every number, is unchanged)."),
        click.option("--augment/--no-augment", default=None,
                     help="Images: train on each batch shifted by up to an eighth of its size and mirrored at "
                          "random, the teacher's outputs computed on the shifted images [default: robust "
                          f"{_on_off(MODE_DEFAULTS['robust']['augment'])}, detrimental "
                          f"{_on_off(MODE_DEFAULTS['detrimental']['augment'])}; off for text]."),
        click.option("--hardening", type=click.Choice(HARDENINGS), default=None,
                     help="Robust mode: how hard the student is trained to hold, as the defaults of --weight-grid and "
                          "--quant-target. full: the weight grid on, the quantized passes toward the student's own "
                          "fp32 outputs (for networks that collapse; costs a small one some fp32 accuracy); light: "
                          "the grid off, toward the teacher's outputs; auto: full when the teacher loses more than "
                          f"{AUTO_HARDENING_POINTS:g} points of held-out accuracy under the worst policy a first "
                          "turn of the agent and a fresh search find before training, light otherwise "
                          f"[default: {MODE_DEFAULTS['robust']['hardening']}]."),
        click.option("--weight-grid/--no-weight-grid", default=None,
                     help="Keep the student's Conv, Gemm and MatMul weights on the per-tensor grid of the narrowest "
                          "width in --bits (k * max|w| / 7 at 4 bits), training full-precision copies behind them: "
                          "the policy's weight widths then hardly change the network, and only its activations' "
                          "rounding is left to withstand [default: robust: --hardening's, detrimental "
                          f"{_on_off(MODE_DEFAULTS['detrimental']['weight_grid'])}]."),
        click.option("--quant-target", type=click.Choice(QUANT_TARGETS), default=None,
                     help="Robust mode: what the quantized passes are distilled toward. teacher: the teacher's "
                          "outputs; student: the student's own fp32 outputs on the same batch (held fixed in that "
                          "term), so they train the very difference the audit measures, quantized against fp32 "
                          "[default: --hardening's]."),
        click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=DistillConfig.temperature,
                     show_default=True, help="Distillation temperature."),
        click.option("--policy-limit", type=click.IntRange(min=1), default=DistillConfig.policy_limit, show_default=True,
                     help="Training images held out of training, on which the agent scores its policies."),
        click.option("--policy-steps", type=click.IntRange(min=1), default=DistillConfig.policy_steps, show_default=True,
                     help="Agent steps (9 policies each) per turn."),
        click.option("--batch-size", "-b", type=click.IntRange(min=1), default=DistillConfig.batch_size, show_default=True,
                     help="Deployment batch size: activation ranges in training, the ORT numbers and the audit."),
        click.option("--audit-evaluations", type=click.IntRange(min=1), default=DistillConfig.audit_evaluations,
                     show_default=True, help="Evaluations of the fresh worst-case search run on the student "
                     "(the audit), and of the same search inside training (--refresh, and after the last epoch)."),
        click.option("--device", type=click.Choice(sorted(DEVICES)), default=DistillConfig.device, show_default=True,
                     help="Where torch trains the student; ORT numbers are measured on the CPU."),
        click.option("--seed", type=int, default=DistillConfig.seed, show_default=True),
    ]

    def parse(mode, bits, budget_avg_bits, epochs, train_limit, train_batch_size, min_epoch_batches, lr, lr_schedule,
              quant_weight, balance, policies_per_batch, refresh, equalize, kure, range_reg, range_gradient, augment,
              hardening, weight_grid, quant_target, temperature, policy_limit, policy_steps, batch_size, audit_evaluations, device, seed) -> dict:
        return dict(mode=mode, bits=bits, budget_avg_bits=budget_avg_bits, epochs=epochs, train_limit=train_limit,
                    train_batch_size=train_batch_size, min_epoch_batches=min_epoch_batches, lr=lr,
                    lr_schedule=lr_schedule,
                    quant_weight=quant_weight, balance=balance, policies_per_batch=policies_per_batch,
                    refresh=refresh, equalize=equalize, kure=kure, range_reg=range_reg, range_gradient=range_gradient,
                    augment=augment, hardening=hardening, weight_grid=weight_grid, quant_target=quant_target,
                    temperature=temperature, policy_limit=policy_limit,
                    policy_steps=policy_steps, batch_size=batch_size, audit_evaluations=audit_evaluations,
                    device=device, seed=seed)

    return _option_group(f, options, parse, "distill_settings")


@cli.command(name="distill")
@click.argument("teacher", metavar="TEACHER.onnx")
@data_options
@distill_options
@click.option("--output", "-o", default=None, help="Run folder [default: runs/distill-<mode>-<model>-<time>].")
@click.option("--resume", is_flag=True, help="Continue the run in --output from the checkpoint its last finished "
              "epoch wrote (checkpoint.pt), with the same settings; it ends as an uninterrupted run would.")
@optimize_option
@progress_option
@json_option
@debug_option
def distill_command(teacher, data_config, distill_settings, output, resume, optimize, no_progress, as_json):
    """Distil from TEACHER.onnx a student that behaves like it in full precision but collapses
    (--mode detrimental) or holds (--mode robust) under the bit-width policy an RL agent learns
    jointly with it, then measure both on ONNX Runtime: teacher and student FP32, the student under its
    policy and under w8a8, and the worst case a fresh `search` finds on it without knowing the policy.
    Trains on the train split; numbers come from --split test. Writes student.onnx, policy.yaml,
    summary.json, trace.jsonl (one record per epoch), checkpoint.pt (after each epoch, for --resume) and the
    audit's search folder.

    Example:

    \b
      ptqaudit distill sample_models/digits_cnn.onnx --mode detrimental -o runs/digits-detrimental
    """
    if output is None:
        if resume:
            raise PtqauditError("--resume needs --output, the run folder to continue")
        output = _default_run_folder(f"distill-{distill_settings['mode']}", teacher)
    config = DistillConfig(teacher=teacher, data=data_config, output=output, optimize=optimize, **distill_settings)
    config.validate()
    test = load_dataset(data_config)
    train = load_dataset(dataclasses.replace(data_config, split="train", limit=None))
    loaded = load_model(teacher, test.x.shape[1:], optimize)  # the data gives the dims a model may leave symbolic
    echo = functools.partial(progress.write, err=as_json)
    try:
        summary = run_distill(config, loaded, train, test, progress=not no_progress, echo=echo, resume=resume)
    except KeyboardInterrupt:
        click.echo(f"ptqaudit: interrupted; {output} keeps every finished epoch: continue with "
                   f"`ptqaudit distill ... -o {output} --resume`", err=True)
        sys.exit(130)
    if as_json:
        _print_json(summary.to_dict())
        return
    click.echo("\n" + summary.table())
    click.echo(f"student, policy and details in {output}/ (student.onnx, policy.yaml, summary.json, audit/)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps errors to exit codes and one-line messages (the traceback with --debug)."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or bool(os.environ.get("PTQAUDIT_DEBUG"))
    try:
        code = cli.main(args=args, prog_name="ptqaudit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ptqaudit: interrupted", err=True)
        code = 130
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "ptqaudit"
        click.echo(f"ptqaudit: error: {exc.format_message()} (`{command} --help` lists the options)", err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except (PtqauditError, GateFailed) as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"ptqaudit: {'error: ' if isinstance(exc, PtqauditError) else ''}{exc}", err=True)
        code = exc.exit_code
    except Exception as exc:  # a bug: say so plainly, keep exit codes 1 and 2 for their meanings
        if debug:
            traceback.print_exc()
        else:
            click.echo(f"ptqaudit: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        code = EXIT_INTERNAL_ERROR
    sys.exit(code or 0)
