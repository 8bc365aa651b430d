"""Running the simulator over a dataset like the ORT engine does, and measuring how well the two agree."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..data import Dataset
from ..predictions import Predictions
from ..progress import track
from .model import SimModel

SAMPLE_RANGE_CHUNK = 64  # inputs per simulator call with per-input ranges: tensors stay in cache (fastest measured)


def simulation_plan(batch_size: int) -> tuple[str, int]:
    """(ranges, inputs per call) reproducing ORT at a deployment batch size: batch size 1 is simulated
    with per-input ranges in large chunks (same numbers, far fewer calls); larger batches run as
    they are, since their range is shared by the whole batch."""
    return ("sample", SAMPLE_RANGE_CHUNK) if batch_size == 1 else ("batch", batch_size)


def simulation_batches(dataset: Dataset, batch_size: int) -> list[np.ndarray]:
    """The example indices of each simulator call reproducing ORT at `batch_size` (simulation_plan). Text padded
    per batch at batch size 1 is fed unpadded, one sentence at a time: it is simulated in groups of sentences of
    one length, which need no padding either."""
    ranges, chunk = simulation_plan(batch_size)
    if not (ranges == "sample" and dataset.is_text and dataset.x.padding == "longest"):
        return [np.arange(start, min(start + chunk, len(dataset))) for start in range(0, len(dataset), chunk)]
    order = np.argsort(dataset.x.lengths, kind="stable")
    lengths = dataset.x.lengths[order]
    groups = np.split(order, np.flatnonzero(np.diff(lengths)) + 1)
    return [group[start:start + chunk] for group in groups for start in range(0, len(group), chunk)]


def sim_predict_many(sim: SimModel, dataset: Dataset, policies: list, batch_size: int, desc: str = "sim",
                     progress: bool = True) -> list[Predictions]:
    """Logits of every policy on every example, sharing the work policies have in common."""
    ranges, _ = simulation_plan(batch_size)
    calls = simulation_batches(dataset, batch_size)
    outputs: list[np.ndarray | None] = [None] * len(policies)
    start = time.perf_counter()
    with torch.inference_mode():
        for indices in track(calls, desc, "batch", progress, len(calls)):
            x = dataset.x[indices]
            x = x.trimmed() if dataset.is_text else x
            for p, logits in enumerate(sim.forward_many(sim.feed(x), policies, ranges)):
                if outputs[p] is None:
                    outputs[p] = np.empty((len(dataset), logits.shape[1]), dtype=np.float32)
                outputs[p][indices] = logits.cpu().numpy()
    seconds = time.perf_counter() - start
    # throughput per policy: the shared pass divided evenly, which is what a search pays per policy
    return [Predictions(out, seconds / len(policies)) for out in outputs]


def sim_predict(sim: SimModel, dataset: Dataset, policy, batch_size: int, desc: str = "sim", progress: bool = True) -> Predictions:
    return sim_predict_many(sim, dataset, [policy], batch_size, desc, progress)[0]


@dataclass
class EngineAgreement:
    """How closely the simulator reproduced ORT on the same inputs."""

    top1_agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float

    @classmethod
    def between(cls, ort_run: Predictions, sim_run: Predictions) -> "EngineAgreement":
        diff = np.abs(ort_run.logits.astype(np.float64) - sim_run.logits)
        return cls(float(np.mean(ort_run.labels == sim_run.labels)), float(diff.max()), float(diff.mean()))
