"""Rebuilds ptqaudit's sample ONNX models (three image, two SST-2 text classifiers) deterministically from data.

Usage:
    python sample_models/build.py digits|digits-resnet56|cifar10|sst2-bert|sst2-lstm|all
        [--cifar10-root DIR] [--sst2 PATH] [--out DIR]

Each model is trained from fixed seeds on CPU, exported with the TorchScript-based
ONNX exporter (opset 17, output `logits` with a dynamic `batch` dimension), checked
with onnx.checker, and scored by onnxruntime on the exported file. The accuracy
printed is measured on that file, not on the PyTorch model.

The image models take `input` (float32 NCHW in [0, 1], dynamic `batch`). The text
models are trained on GLUE SST-2, read from --sst2: the SST-2.tar.gz tarball or an
extracted SST-2 folder holding train.tsv and dev.tsv (default: ../shared/data/SST-2.tar.gz,
relative to the repository root). Both write and share sst2_tokenizer.json, a WordPiece tokenizer
trained on the SST-2 training sentences, and take int64 [batch, sequence] token ids
(dynamic `batch` and `sequence`): sst2_bert.onnx takes input_ids, attention_mask and
token_type_ids, sst2_lstm.onnx takes input_ids only. `all` builds the text models only
when --sst2 is given or the default tarball exists, so the image models never need SST-2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import sys
import tarfile
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing the package

from ptqaudit.data import DataConfig, Dataset, load_dataset  # noqa: E402
from ptqaudit.errors import PtqauditError  # noqa: E402

SEED = 0
OPSET = 17
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm", "LSTM")  # with the weight as input 1

# CIFAR-10 training-set channel statistics; normalisation lives inside the graph,
# so users feed float32 NCHW images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SST2_DEFAULT = HERE.parent.parent / "shared" / "data" / "SST-2.tar.gz"
TOKENIZER_FILE = "sst2_tokenizer.json"
VOCAB_SIZE = 6000
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, BERT's names
MAX_TOKENS = 64  # [CLS] + up to 62 word pieces + [SEP]


# --------------------------------------------------------------------------- data


def load_split(name: str, split: str, root: str | None = None) -> Dataset:
    """One split ("train" | "test") of "digits" or "cifar10", by the project's own loader.

    `.x` is float32 NCHW in [0, 1], `.y` int64. digits is split exactly as
    train_test_split(test_size=0.3, stratify=y, random_state=0) does; cifar10 is read
    from a standard cifar-10-batches-py folder (`root` or the folder that holds it).
    """
    return load_dataset(DataConfig(name=name, root=root, split=split))


def read_sst2(source: Path, split: str) -> tuple[list[str], np.ndarray]:
    """SST-2's "train" or "dev" split (sentences, int64 labels) from the GLUE tarball or an extracted SST-2 folder.

    The tar member is read in place, without extracting it. QUOTE_NONE because sentences hold
    bare quote characters (`" the film "`) that are text, not CSV quoting.
    """
    member = f"{split}.tsv"
    with contextlib.ExitStack() as stack:
        if source.is_dir():
            if not (source / member).is_file():
                raise PtqauditError(f"{source}: no {member} in the folder")
            raw = stack.enter_context(open(source / member, "rb"))
        else:
            tar = stack.enter_context(tarfile.open(source))
            names = [name for name in tar.getnames() if Path(name).name == member]
            if len(names) != 1:
                raise PtqauditError(f"{source}: expected one {member} in the tarball, found {len(names)}")
            raw = stack.enter_context(tar.extractfile(names[0]))
        header, *rows = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline=""),
                                   delimiter="\t", quoting=csv.QUOTE_NONE)
    if header != ["sentence", "label"]:
        raise PtqauditError(f"{source}: {member} starts with {header}, expected sentence<TAB>label")
    return [row[0] for row in rows], np.array([int(row[1]) for row in rows], dtype=np.int64)


def train_tokenizer(sentences: list[str]):
    """An uncased BERT-style WordPiece tokenizer (about VOCAB_SIZE entries) trained on `sentences`.

    Same components as Hugging Face's bert-base-uncased tokenizer.json: BertNormalizer,
    BertPreTokenizer, WordPiece with `##` continuations, and a post-processor that adds [CLS] and
    [SEP]. No padding or truncation is stored: whoever encodes chooses those.
    """
    # Imported here so that the image recipes do not need the tokenizers package.
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(sentences, trainer, length=len(sentences))
    # The trainer numbers the pieces partly in hash-map order, which changes from run to run
    # (huggingface/tokenizers#1794) while the set of pieces it learns here does not: renumber them
    # in sorted order after the special tokens, so that the file and the models are reproducible.
    pieces = sorted(set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *pieces])}
    tokenizer.model = models.WordPiece(vocab, unk_token="[UNK]")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def encode(tokenizer, sentences: list[str]) -> list[list[int]]:
    """Token ids of each sentence: [CLS] ... [SEP], cut as the tokenizer's truncation says."""
    return [e.ids for e in tokenizer.encode_batch(sentences)]


def pad_batch(encoded: list[list[int]]) -> dict[str, np.ndarray]:
    """BERT's three int64 [batch, longest] inputs: ids right-padded with [PAD] = 0, the mask 1 on real
    tokens, token types all 0 (one segment)."""
    ids = np.zeros((len(encoded), max(map(len, encoded))), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, tokens in enumerate(encoded):
        ids[i, : len(tokens)] = tokens
        mask[i, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


# --------------------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    """8x8 digits: 2 Conv, 1 Gemm and 1 plain MatMul, so every quantizable op type appears."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, hidden)  # 2-D input: exports as Gemm
        self.w = nn.Parameter(torch.randn(hidden, 10) / hidden**0.5)  # exports as MatMul + Add
        self.b = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 32 x 4 x 4
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return x @ self.w + self.b


class Cifar10CNN(nn.Module):
    """CIFAR-10: in-graph Sub/Div normalisation, 3 x (Conv-BN-ReLU-MaxPool), Linear.

    BatchNorm is folded into the convolutions by the exporter (eval mode), so the ONNX
    graph holds Sub, Div, 3 x (Conv, Relu, MaxPool), Flatten, Gemm.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
        c1, c2, c3 = widths
        self.conv1, self.bn1 = nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2)
        self.conv3, self.bn3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # 16 x 16
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 8 x 8
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # 4 x 4
        return self.fc(torch.flatten(x, 1))


class ResidualBlock(nn.Module):
    """Two Conv-BN(-ReLU) with an identity shortcut; where the block downsamples, the shortcut takes every
    other pixel and zero-pads the new channels ("option A"), so every quantizable layer is a 3x3 conv."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.pad = channels_out - channels_in
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet-(6n+2) of He et al. 2016 for small images (option-A shortcuts): a stem conv, three stages of
    n residual blocks (the 2nd and 3rd halve the resolution), global average pooling and one Gemm, so
    6n + 1 convs and a Gemm are quantizable. n = 9 gives ResNet-56: 56 layers, the depth the search
    has to scale to. Normalisation, if any, lives inside the graph."""

    def __init__(self, in_channels: int, blocks_per_stage: int, widths: tuple[int, int, int],
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.normalise = mean is not None
        if self.normalise:
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.conv1, self.bn1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0])
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                blocks.append(ResidualBlock(channels, width, 2 if stage > 0 and index == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            x = (x - self.mean) / self.std
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits_resnet56() -> ResNet:
    """8x8 digits, 56 quantizable layers (widths 16, 32, 64 at 8x8, 4x4, 2x2): a deep model that trains in
    a minute on a CPU, where a CIFAR-10 ResNet-56 takes an hour per epoch on two cores."""
    return ResNet(1, 9, (16, 32, 64))


# The BERT classes follow Hugging Face's modeling_bert (module names, operation order, the
# extended mask), so that the export has the node names and the graph shape of a Hugging Face
# BERT export (/bert/encoder/layer.0/attention/self/query/MatMul, ...) and
# onnxruntime.transformers.optimizer fuses it like one.


class BertEmbeddings(nn.Module):
    """Word + token type + position embeddings, LayerNorm, dropout. Position ids are a slice of a
    buffer, as in Hugging Face, which exports as the Slice that the optimizer's embedding fusion expects."""

    def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_positions).expand((1, -1)), persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        position_ids = self.position_ids[:, 0 : input_ids.size(1)]
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over the 3-D hidden states, with an additive mask."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size()[:-1] + (self.num_attention_heads, self.attention_head_size))
        return x.permute(0, 2, 1, 3)  # [batch, heads, sequence, head size]

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(query_layer, key_layer.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        probs = self.dropout(F.softmax(scores + attention_mask, dim=-1))
        context = torch.matmul(probs, value_layer).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (self.num_attention_heads * self.attention_head_size,))


class BertResidualOutput(nn.Module):
    """Dense, dropout, then LayerNorm of the residual sum (post-LN): Hugging Face's BertSelfOutput and BertOutput."""

    def __init__(self, width_in: int, hidden: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(width_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, dropout)
        self.output = BertResidualOutput(hidden, hidden, dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class BertLayer(nn.Module):
    """Attention block, then the feed-forward block (dense, erf GELU, dense), each with its residual LayerNorm."""

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float):
        super().__init__()
        self.attention = BertAttention(hidden, heads, dropout)
        self.intermediate = nn.Sequential(
            OrderedDict(dense=nn.Linear(hidden, intermediate), intermediate_act_fn=nn.GELU())
        )
        self.output = BertResidualOutput(intermediate, hidden, dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int, dropout: float):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(hidden, heads, intermediate, dropout) for _ in range(layers))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


class BertPooler(nn.Module):
    """Dense + tanh on the hidden state of the first token, [CLS]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)  # 2-D input: exports as Gemm
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class BertModel(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int,
                 max_positions: int, type_vocab_size: int, dropout: float):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, hidden, max_positions, type_vocab_size, dropout)
        self.encoder = BertEncoder(layers, hidden, heads, intermediate, dropout)
        self.pooler = BertPooler(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        # Hugging Face's extended mask: 0 where attended, the lowest float32 where padded, added to the
        # scores of every head and query position.
        extended = attention_mask[:, None, None, :].to(torch.float32)
        extended = (1.0 - extended) * torch.finfo(torch.float32).min
        hidden_states = self.encoder(self.embeddings(input_ids, token_type_ids), extended)
        return self.pooler(hidden_states)


class BertForSequenceClassification(nn.Module):
    """A small BERT (2 layers, hidden 128, 4 heads, feed-forward 256, 128 positions) with a 2-way classifier
    on the pooled [CLS] state. Every dense layer is a quantizable MatMul (3-D input) or Gemm (pooler, classifier)."""

    def __init__(self, vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 4,
                 intermediate: int = 256, max_positions: int = 128, type_vocab_size: int = 2,
                 dropout: float = 0.1, labels: int = 2):
        super().__init__()
        self.bert = BertModel(vocab_size, hidden, layers, heads, intermediate, max_positions,
                              type_vocab_size, dropout)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, labels)  # 2-D input: exports as Gemm
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Hugging Face's BERT initialisation: N(0, 0.02) weights, zero biases, the [PAD] embedding zero."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.bert(input_ids, attention_mask, token_type_ids)))


class SST2LSTM(nn.Module):
    """Embedding, one LSTM (a single ONNX LSTM node), the mean of its outputs over the non-[PAD] steps, Linear.

    The mask is computed in the graph from input_ids (id 0 is [PAD]), so the model takes input_ids only.
    Padding is on the right and the LSTM runs forward, so the outputs at real tokens do not depend on
    how much padding follows: the logits are the same at any padded length.
    """

    def __init__(self, vocab_size: int, embedding: int = 64, hidden: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding, padding_idx=0)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 2)  # 2-D input: exports as Gemm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != 0).unsqueeze(-1).to(torch.float32)
        outputs, _ = self.lstm(self.embedding(input_ids))
        pooled = (outputs * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.fc(pooled)


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float  # peak learning rate of the one-cycle schedule
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adam"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = False  # random crop (pad 4, reflect) + horizontal flip
    channels_last: bool = False  # faster convolutions on CPU


def augment_batch(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random crop of a reflect-padded image and a random horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    dy = rng.integers(0, 2 * pad + 1, size=n)
    dx = rng.integers(0, 2 * pad + 1, size=n)
    flip = rng.random(n) < 0.5
    out = np.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, :, ::-1] if flip[i] else crop
    return out


def take_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, clip: tuple | None = None) -> None:
    """One optimizer and schedule step on `loss`; clip = (parameters, max norm) clips the gradient norm first."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(*clip)
    opt.step()
    sched.step()


def print_epoch(epoch: int, epochs: int, loss_sum: float, correct: int, seen: int, started: float) -> None:
    print(
        f"  epoch {epoch:2d}/{epochs}  loss {loss_sum / seen:.4f}  "
        f"train acc {100 * correct / seen:5.2f}%  {time.perf_counter() - started:5.1f}s",
        flush=True,
    )


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, seed: int = SEED) -> nn.Module:
    """Trains in place with a one-cycle learning rate; prints one line per epoch."""
    rng = np.random.default_rng(seed)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(data.y)
    steps_per_epoch = n // cfg.batch_size  # drop the last partial batch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
    )
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        loss_sum, correct, seen = 0.0, 0, 0
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            xb = data.x[idx]
            if cfg.augment:
                xb = augment_batch(xb, rng)
            xb = torch.from_numpy(np.ascontiguousarray(xb)).contiguous(memory_format=fmt)
            yb = torch.from_numpy(data.y[idx])
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
            take_step(loss, opt, sched)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        print_epoch(epoch, cfg.epochs, loss_sum, correct, seen, t0)
    return model.to(memory_format=torch.contiguous_format).eval()


@dataclass
class TextTrainConfig:
    epochs: int
    batch_size: int
    lr: float  # peak learning rate of AdamW: linear warmup, then linear decay to 0
    warmup: float = 0.1  # fraction of all steps spent warming up
    weight_decay: float = 0.01  # on matrices and embedding tables, not on biases and LayerNorm
    grad_clip: float = 1.0  # max global gradient norm


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                   pool: int = 50) -> list[np.ndarray]:
    """One epoch of shuffled batches of similar-length sentences, so padding to each batch's longest costs little.

    The data is shuffled, cut into pools of `pool` batches, each pool sorted by length and cut into
    batches, and the batches shuffled.
    """
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_text(model: nn.Module, encoded: list[list[int]], labels: np.ndarray, input_names: tuple[str, ...],
               cfg: TextTrainConfig, seed: int = SEED) -> nn.Module:
    """Trains a text classifier in place with AdamW and warmup + linear decay; prints one line per epoch."""
    rng = np.random.default_rng(seed)
    lengths = np.array([len(tokens) for tokens in encoded])
    epochs = [length_batches(lengths, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    total = sum(map(len, epochs))
    warmup = max(1, round(cfg.warmup * total))
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        fused=True,  # one kernel for all parameters: about 15% faster steps on CPU for the BERT
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: step / warmup if step < warmup else (total - step) / (total - warmup)
    )
    model.train()
    for epoch, batches in enumerate(epochs, 1):
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for idx in batches:
            inputs = pad_batch([encoded[i] for i in idx])
            yb = torch.from_numpy(labels[idx])
            logits = model(*(torch.from_numpy(inputs[name]) for name in input_names))
            loss = F.cross_entropy(logits, yb)
            take_step(loss, opt, sched, (params, cfg.grad_clip))
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        print_epoch(epoch, cfg.epochs, loss_sum, correct, seen, t0)
    return model.eval()


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[str]:
    """A temporary file next to `path` that replaces `path` only when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_onnx(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path,
                axes: dict[int, str]) -> onnx.ModelProto:
    """Exports with the TorchScript exporter (dynamo=False), checks, writes atomically.

    `inputs` are the forward arguments in order, by graph input name; every input gets the dynamic
    `axes`, and `logits` a dynamic `batch`.
    """
    model.eval()
    with atomic_output(path) as tmp:
        with warnings.catch_warnings():
            # torch >= 2.9 flags the TorchScript exporter as legacy (DeprecationWarning); it
            # still works, needs no onnxscript and names nodes after modules (/conv1/Conv).
            warnings.simplefilter("ignore", DeprecationWarning)
            # The LSTM's zero initial states are built from the input's batch size (Shape ->
            # ConstantOfShape), so other batch sizes work; check_text_export runs them.
            warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
            torch.onnx.export(
                model,
                tuple(inputs.values()),
                tmp,
                input_names=list(inputs),
                output_names=["logits"],
                dynamic_axes={**{name: axes for name in inputs}, "logits": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,  # with eval mode, also folds BatchNorm into Conv
                dynamo=False,
            )
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto, full_check=True)
    return proto


def ort_accuracy(path: Path, data: Dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of the ONNX file on a split, computed by onnxruntime on CPU."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for s in range(0, len(data.y), batch_size):
        (logits,) = sess.run(["logits"], {"input": data.x[s : s + batch_size]})
        correct += int((logits.argmax(1) == data.y[s : s + batch_size]).sum())
    return 100.0 * correct / len(data.y)


def ort_text_accuracy(path: Path, encoded: list[list[int]], labels: np.ndarray, input_names: tuple[str, ...],
                      batch_size: int = 128) -> int:
    """Sentences the ONNX file classifies right, by onnxruntime on CPU, each batch padded to its longest."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for s in range(0, len(labels), batch_size):
        inputs = pad_batch(encoded[s : s + batch_size])
        (logits,) = sess.run(["logits"], {name: inputs[name] for name in input_names})
        correct += int((logits.argmax(1) == labels[s : s + batch_size]).sum())
    return correct


def check_text_export(model: nn.Module, path: Path, batches: list[list[list[int]]], input_names: tuple[str, ...],
                      atol: float = 1e-4) -> str:
    """Compares onnxruntime's logits on the file with PyTorch's on batches of different padded lengths, so the
    dynamic sequence axis is exercised; raises if they differ by more than `atol`."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report = []
    for encoded in batches:
        padded = pad_batch(encoded)
        inputs = {name: padded[name] for name in input_names}
        (ort_logits,) = sess.run(["logits"], inputs)
        with torch.no_grad():
            torch_logits = model(*(torch.from_numpy(v) for v in inputs.values())).numpy()
        diff = float(np.abs(ort_logits - torch_logits).max())
        shape = inputs["input_ids"].shape
        if diff > atol:
            raise RuntimeError(f"{path}: onnxruntime and torch logits differ by {diff:.2e} at input shape {shape}")
        report.append(f"{shape[0]}x{shape[1]}: {diff:.1e}")
    return "max |onnxruntime - torch| " + ", ".join(report)


def quantizable_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes with a constant weight: Conv, MatMul, Gemm and LSTM on an initializer, Gather from an initializer
    table (embeddings). MatMuls of two activations (attention scores) are not among them."""
    constants = {t.name for t in proto.graph.initializer}
    return [
        n for n in proto.graph.node
        if (n.op_type in QUANTIZABLE_OPS and n.input[1] in constants)
        or (n.op_type == "Gather" and n.input[0] in constants)
    ]


def describe(proto: onnx.ModelProto) -> str:
    ops = [n.op_type for n in proto.graph.node]
    layers = [n.name for n in quantizable_nodes(proto)]
    return f"{len(layers)} quantizable layers ({', '.join(layers)}); op types: {sorted(set(ops))}"


# --------------------------------------------------------------------------- recipes


def seed_everything(seed: int = SEED) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)


# name -> (file, model factory, training recipe)
RECIPES: dict[str, tuple[str, Callable[[], nn.Module], TrainConfig]] = {
    "digits": (
        "digits_cnn.onnx",
        DigitsCNN,
        TrainConfig(epochs=30, batch_size=32, lr=3e-3, optimizer="adam", weight_decay=1e-4),
    ),
    "digits-resnet56": (
        "digits_resnet56.onnx",
        digits_resnet56,
        TrainConfig(epochs=30, batch_size=32, lr=0.05, optimizer="sgd", weight_decay=5e-4),
    ),
    "cifar10": (
        "cifar10_cnn.onnx",
        Cifar10CNN,
        TrainConfig(
            epochs=12, batch_size=256, lr=0.2, optimizer="sgd", weight_decay=5e-4,
            label_smoothing=0.1, augment=True, channels_last=True,
        ),
    ),
}

# name -> (file, model factory taking the vocabulary size, graph inputs in forward order, training recipe)
TEXT_RECIPES: dict[str, tuple[str, Callable[[int], nn.Module], tuple[str, ...], TextTrainConfig]] = {
    "sst2-bert": (
        "sst2_bert.onnx",
        BertForSequenceClassification,
        ("input_ids", "attention_mask", "token_type_ids"),
        TextTrainConfig(epochs=2, batch_size=64, lr=1e-3),
    ),
    "sst2-lstm": (
        "sst2_lstm.onnx",
        SST2LSTM,
        ("input_ids",),
        TextTrainConfig(epochs=2, batch_size=64, lr=3e-3),
    ),
}


def build(name: str, out: Path, cifar10_root: str | None) -> float:
    """Trains, exports and scores one sample image model; returns its ORT FP32 test accuracy (%)."""
    filename, factory, cfg = RECIPES[name]
    data = name.split("-")[0]  # the recipe's data set: "digits" or "cifar10"
    root = cifar10_root if data == "cifar10" else None
    t0, cpu0 = time.perf_counter(), time.process_time()
    seed_everything()
    model = factory()
    train_split, test_split = load_split(data, "train", root), load_split(data, "test", root)
    print(f"[{name}] {len(train_split)} train / {len(test_split)} test images; {cfg}", flush=True)
    t_train, cpu_train = time.perf_counter(), time.process_time()
    train(model, train_split, cfg)
    train_s, train_cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train
    path = out / filename
    proto = export_onnx(model, {"input": torch.from_numpy(test_split.x[:2])}, path, {0: "batch"})
    acc = ort_accuracy(path, test_split)
    print(f"[{name}] wrote {path} ({path.stat().st_size / 1024:.1f} KB); {describe(proto)}")
    print(
        f"[{name}] FP32 test accuracy (onnxruntime on the file, {len(test_split)} images): {acc:.2f}%"
    )
    print(
        f"[{name}] training {train_s:.1f}s wall ({train_cpu_s:.1f}s CPU, {torch.get_num_threads()} threads); "
        f"whole build {time.perf_counter() - t0:.1f}s wall ({time.process_time() - cpu0:.1f}s CPU)",
        flush=True,
    )
    return acc


def build_text(name: str, out: Path, sst2: Path) -> float:
    """Trains, exports and scores one SST-2 model, writing the tokenizer beside it; returns its ORT FP32 dev
    accuracy (%)."""
    filename, factory, input_names, cfg = TEXT_RECIPES[name]
    t0, cpu0 = time.perf_counter(), time.process_time()
    seed_everything()
    train_sentences, train_labels = read_sst2(sst2, "train")
    dev_sentences, dev_labels = read_sst2(sst2, "dev")
    tokenizer = train_tokenizer(train_sentences)
    with atomic_output(out / TOKENIZER_FILE) as tmp:
        tokenizer.save(tmp)
    # Set after saving: the file leaves truncation to whoever encodes. Hugging Face's truncation
    # drops word pieces from the end and keeps [CLS] and the final [SEP].
    tokenizer.enable_truncation(MAX_TOKENS)
    train_ids, dev_ids = encode(tokenizer, train_sentences), encode(tokenizer, dev_sentences)
    model = factory(tokenizer.get_vocab_size())
    print(
        f"[{name}] {len(train_ids)} train / {len(dev_ids)} dev sentences; tokenizer (vocabulary "
        f"{tokenizer.get_vocab_size()}) trained, written to {out / TOKENIZER_FILE} and applied in "
        f"{time.perf_counter() - t0:.1f}s; {sum(p.numel() for p in model.parameters())} parameters; {cfg}",
        flush=True,
    )
    t_train, cpu_train = time.perf_counter(), time.process_time()
    train_text(model, train_ids, train_labels, input_names, cfg)
    train_s, train_cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train
    path = out / filename
    sample = pad_batch(dev_ids[:2])
    proto = export_onnx(
        model, {k: torch.from_numpy(sample[k]) for k in input_names}, path, {0: "batch", 1: "sequence"}
    )
    longest = max(range(len(dev_ids)), key=lambda i: len(dev_ids[i]))
    print(f"[{name}] {check_text_export(model, path, [dev_ids[:3], dev_ids[longest : longest + 5]], input_names)}")
    correct = ort_text_accuracy(path, dev_ids, dev_labels, input_names)
    acc = 100.0 * correct / len(dev_labels)
    print(f"[{name}] wrote {path} ({path.stat().st_size / 1024:.1f} KB); {describe(proto)}")
    print(
        f"[{name}] FP32 dev accuracy (onnxruntime on the file, {len(dev_labels)} sentences): "
        f"{acc:.2f}% ({correct}/{len(dev_labels)})"
    )
    print(
        f"[{name}] training {train_s:.1f}s wall ({train_cpu_s:.1f}s CPU, {torch.get_num_threads()} threads); "
        f"whole build {time.perf_counter() - t0:.1f}s wall ({time.process_time() - cpu0:.1f}s CPU)",
        flush=True,
    )
    return acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=[*RECIPES, *TEXT_RECIPES, "all"])
    p.add_argument(
        "--cifar10-root",
        default=None,
        help="cifar-10-batches-py folder or the folder holding it (default: $PTQAUDIT_DATA, then the cache)",
    )
    p.add_argument(
        "--sst2",
        type=Path,
        default=None,
        help=f"GLUE SST-2.tar.gz or an extracted SST-2 folder with train.tsv and dev.tsv (default: {SST2_DEFAULT})",
    )
    p.add_argument("--out", type=Path, default=HERE, help="output folder (default: sample_models/)")
    args = p.parse_args(argv)
    sst2 = args.sst2 or SST2_DEFAULT
    print(
        f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
        f"numpy {np.__version__}; seed {SEED}",
        flush=True,
    )
    if args.model != "all":
        names = [args.model]
    elif args.sst2 is not None or SST2_DEFAULT.exists():
        names = [*RECIPES, *TEXT_RECIPES]
    else:
        names = list(RECIPES)
        print(f"note: no SST-2 data at {SST2_DEFAULT}; skipping {', '.join(TEXT_RECIPES)} (see --sst2)")
    try:
        if any(name in TEXT_RECIPES for name in names) and not sst2.exists():
            raise PtqauditError(f"no SST-2 data at {sst2}: pass --sst2 SST-2.tar.gz (or its extracted SST-2 folder)")
        for name in names:
            if name in TEXT_RECIPES:
                build_text(name, args.out, sst2)
            else:
                build(name, args.out, args.cifar10_root)
    except PtqauditError as exc:
        hint = " (this script's flag is --cifar10-root)" if "--data-root" in str(exc) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
