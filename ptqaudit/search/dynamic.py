"""Dynamic (input-conditioned) policies: a router picks one of a menu of static policies for each input
(or each batch); it is trained on the simulator and run on ONNX Runtime by sending every input to the
cached session of the policy it picked. Each menu policy is within the budget, so any routing is."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

from ..data import Dataset
from ..evaluate import make_session
from ..onnx_graph import LoadedModel
from ..policy import ResolvedPolicy
from ..progress import track
from ..quantize import quantize
from ..sim.engine import sim_predict_many
from ..sim.model import SimModel
from ..text_data import INPUT_IDS, TextInputs, feeds
from .space import Objective


def input_features(x: np.ndarray | TextInputs) -> np.ndarray:
    """What a router can afford to look at: per-channel mean, std, min and max of each input, and its
    largest magnitude (the range that sets the first layer's activation scale); for text, the sentence's
    length and the mean, spread and largest of its token ids."""
    if isinstance(x, TextInputs):
        ids = x.arrays.get(INPUT_IDS, next(iter(x.arrays.values()))).astype(np.float64)
        real = np.arange(ids.shape[1])[None, :] < x.lengths[:, None]
        count = np.maximum(real.sum(axis=1), 1)
        mean = (ids * real).sum(axis=1) / count
        spread = np.sqrt(((ids - mean[:, None]) ** 2 * real).sum(axis=1) / count)
        return np.stack([x.lengths, mean, spread, (ids * real).max(axis=1)], axis=1).astype(np.float32)
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    stats = [flat.mean(axis=2), flat.std(axis=2), flat.min(axis=2), flat.max(axis=2),
             np.abs(flat).max(axis=(1, 2))[:, None]]
    return np.concatenate(stats, axis=1).astype(np.float32)


class Router(nn.Module):
    """A linear classifier over standardized input features choosing a menu entry."""

    def __init__(self, features: np.ndarray, menu_size: int):
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(features.mean(axis=0)))
        self.register_buffer("scale", torch.from_numpy(features.std(axis=0) + 1e-6))
        self.linear = nn.Linear(features.shape[1], menu_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.scale)

    def choose(self, x: np.ndarray, per_batch: bool) -> np.ndarray:
        """Menu index per input, or one for the whole batch (its features averaged)."""
        features = input_features(x)
        if per_batch:
            features = features.mean(axis=0, keepdims=True)
        with torch.no_grad():
            choice = self(torch.from_numpy(features)).argmax(dim=1).numpy()
        return np.repeat(choice, len(x)) if per_batch else choice


def train_router(features: np.ndarray, correct: np.ndarray, objective: Objective, seed: int, steps: int = 300) -> Router:
    """Fit the router to send each input to the menu entries that get it wrong (worst) or right (best):
    the target is uniform over those entries (over all of them when none or all do)."""
    torch.manual_seed(seed)
    wanted = correct == int(objective is Objective.BEST)  # [menu, inputs]: wrong (worst) or right (best)
    wanted = np.where(wanted.any(axis=0, keepdims=True) & ~wanted.all(axis=0, keepdims=True), wanted, True)
    target = torch.from_numpy((wanted / wanted.sum(axis=0, keepdims=True)).T.astype(np.float32))
    router = Router(features, correct.shape[0])
    optimizer = torch.optim.Adam(router.parameters(), lr=0.05)
    inputs = torch.from_numpy(features)
    for _ in range(steps):
        loss = -(target * torch.log_softmax(router(inputs), dim=1)).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return router


@dataclass
class DynamicResult:
    menu: list[str]  # policy digests, in menu order
    oracle_sim_accuracy: float  # every search input sent to its best (or worst) menu entry: the bound
    router_sim_accuracy: float  # what the trained router achieves on the search inputs
    ort_accuracy: float  # the router on ONNX Runtime over the whole evaluation data
    routed_share: list[float]  # fraction of evaluation inputs sent to each menu entry


def dynamic_policy(model: LoadedModel, sim: SimModel, search_set: Dataset, dataset: Dataset, menu: list[ResolvedPolicy],
                   objective: Objective, batch_size: int, seed: int, progress: bool) -> tuple[Router, DynamicResult]:
    """Train a router over `menu` on the simulator, then measure it on ORT by routing."""
    runs = sim_predict_many(sim, search_set, menu, batch_size, progress=False)
    correct = np.stack([run.labels == search_set.y for run in runs]).astype(np.int64)  # [menu, inputs]
    per_batch = batch_size > 1
    features = input_features(search_set.x)
    router = train_router(features, correct, objective, seed)
    if per_batch:  # one choice per batch: its oracle is the best single entry per batch
        routed = np.concatenate([router.choose(x, True) for x, _ in search_set.batches(batch_size)])
        chunks = [correct[:, i : i + batch_size].sum(axis=1) for i in range(0, correct.shape[1], batch_size)]
        oracle_hits = sum(objective.extreme(c) for c in chunks)
        oracle_accuracy = oracle_hits / correct.shape[1]
    else:
        routed = router.choose(search_set.x, False)
        oracle_accuracy = float(objective.extreme(correct, axis=0).mean())
    router_accuracy = float(correct[routed, np.arange(correct.shape[1])].mean())

    sessions: dict[int, ort.InferenceSession] = {}
    hits, counts = 0, np.zeros(len(menu), dtype=np.int64)
    total = -(-len(dataset) // batch_size)
    for x, y in track(dataset.batches(batch_size), f"verify dynamic {objective} on ORT", "batch", progress, total):
        entry = int(router.choose(x, per_batch)[0])  # batch size 1: the input's own choice
        if entry not in sessions:
            sessions[entry] = make_session(quantize(model, menu[entry]))
        logits = sessions[entry].run(None, feeds(x, model.inputs))[0]
        counts[entry] += len(x)
        hits += int(np.sum(logits.argmax(axis=1) == y))
    result = DynamicResult(menu=[p.digest for p in menu], oracle_sim_accuracy=oracle_accuracy,
                           router_sim_accuracy=router_accuracy, ort_accuracy=hits / len(dataset),
                           routed_share=(counts / counts.sum()).tolist())
    return router, result
