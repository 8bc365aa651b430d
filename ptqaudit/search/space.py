"""The search space: per-layer weight and activation bits, the budget, and projection onto it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from ..errors import PtqauditError
from ..onnx_graph import Layer
from ..policy import MAX_BITS, MIN_BITS, LayerQuant, ResolvedPolicy, bitops_of, effective_bits_of



class Objective(StrEnum):
    """The case a search looks for. The worst case: the lowest accuracy among policies costing at least the
    budget (a floor). The best case: the highest accuracy among policies costing at most it (a ceiling).
    Its value ("worst", "best") is the name in options, files and messages."""

    WORST = "worst"
    BEST = "best"

    @property
    def sign(self) -> int:
        """-1 when lower accuracy is the goal (worst), +1 when higher is (best); also the direction that
        brings a policy's cost within the budget is -sign (worst: up to the floor, best: down to the ceiling)."""
        return -1 if self is Objective.WORST else 1

    def admits(self, cost: float, budget: float) -> bool:
        """Whether a policy costing `cost` is within the budget: at or above the floor, or at or below the ceiling."""
        return self.sign * (cost - budget) <= 0

    def key(self, accuracy):
        """A sort key, lower for what this objective seeks (works elementwise on arrays)."""
        return -self.sign * accuracy

    def better(self, a: float, b: float) -> bool:
        """Whether accuracy a is further toward this objective than b."""
        return self.key(a) < self.key(b)

    def pick(self, items, accuracy):
        """The item whose accuracy(item) this objective seeks most (the first among equals)."""
        return min(items, key=lambda item: self.key(accuracy(item)))

    def extreme(self, values: np.ndarray, axis: int | None = None):
        """The lowest (worst) or highest (best) of `values` along `axis`."""
        return (np.min if self is Objective.WORST else np.max)(values, axis=axis)


OBJECTIVES = tuple(Objective)
WEIGHT, ACTIVATION = 0, 1  # operand axis of a choice array


def check_bits(bits: tuple[int, ...]) -> None:
    """The --bits a layer's operands may choose from: at least one, each a width policies accept."""
    if not bits or any(not MIN_BITS <= b <= MAX_BITS for b in bits):
        raise PtqauditError(f"--bits must list widths from {MIN_BITS} to {MAX_BITS}, got {list(bits)}")


@dataclass(frozen=True)
class Budget:
    """The cost a policy is held to, in BitOPs per input. The worst case is searched among policies at
    or above it (a floor: without one, 2 bits everywhere is a trivial worst case); the best case among
    policies at or below it (a ceiling: without one, 8 bits everywhere is a trivial best case)."""

    bitops: int

    @classmethod
    def from_average_bits(cls, average_bits: float, total_macs: int) -> "Budget":
        return cls(int(math.ceil(average_bits**2 * total_macs)))

    def effective_bits(self, total_macs: int) -> float:
        return effective_bits_of(self.bitops, total_macs)

    def admits(self, bitops: int, objective: Objective) -> bool:
        return objective.admits(bitops, self.bitops)


class SearchSpace:
    """Layers whose bits are searched, each operand choosing from `bits`; the base policy fixes the
    weight granularity and the kernel options, and pins layers (fp32 layers, and layers outside --layers)
    to its setting. The budget holds the searched layers: a policy's cost is their BitOPs, and a budget in
    effective bits is of their MACs (pinned layers cost the same in every policy, and an fp32 one, such as a
    transformer's float attention, would otherwise meet any floor by itself).
    A choice is an int array [searched layers, 2] of indices into `bits` (weight, activation)."""

    def __init__(self, layers: list[Layer], base: ResolvedPolicy, bits: tuple[int, ...], searched: list[str],
                 budget: Budget | float):
        """budget: in BitOPs, or a number of effective bits over the searched layers."""
        self.layers = layers
        self.base = base
        self.bits = tuple(sorted(set(bits)))
        self.searched = [layer for layer in layers if layer.name in set(searched) and base.mapping[layer.name] is not None]
        if not self.searched:
            raise PtqauditError("nothing to search: every selected layer is fp32 in the base policy")
        self._macs = np.array([layer.macs for layer in self.searched], dtype=np.int64)
        self.macs = int(self._macs.sum())  # what the budget's effective bits are of
        self.budget = budget if isinstance(budget, Budget) else Budget.from_average_bits(budget, self.macs)
        self._bits = np.array(self.bits, dtype=np.int64)
        self.bitops_range = (self.bitops(self.uniform(0)), self.bitops(self.uniform(len(self.bits) - 1)))

    @property
    def size(self) -> int:
        return len(self.bits) ** (2 * len(self.searched))

    def uniform(self, index: int) -> np.ndarray:
        return np.full((len(self.searched), 2), index, dtype=np.int64)

    def uniform_pair(self, weight_index: int, activation_index: int) -> np.ndarray:
        """Every searched layer at one weight width and one activation width (indices into bits)."""
        choice = self.uniform(weight_index)
        choice[:, ACTIVATION] = activation_index
        return choice

    def uniform_frontier(self, objective: Objective) -> list[np.ndarray]:
        """The uniform policies on the budget's edge, widest first (best case) or narrowest first (worst):
        those it admits and no other admitted uniform policy is as wide (best) or as narrow (worst) in both
        operands. They are what a user compares a search with, and a policy they dominate is at best
        equally extreme."""
        pairs = [(w, a) for w in range(len(self.bits)) for a in range(len(self.bits))
                 if self.budget.admits(self.bitops(self.uniform_pair(w, a)), objective)]
        # "beyond": as far in the objective's direction (wider for best, narrower for worst) in both operands
        direction = objective.sign

        def beyond(p, q):
            return p != q and direction * (p[0] - q[0]) >= 0 and direction * (p[1] - q[1]) >= 0

        frontier = [p for p in pairs if not any(beyond(q, p) for q in pairs)]
        frontier.sort(key=lambda p: -direction * (self.bits[p[0]] * self.bits[p[1]]))
        return [self.uniform_pair(w, a) for w, a in frontier]

    def uniform_label(self, choice: np.ndarray) -> str:
        """'W6A6' for a uniform choice."""
        return f"W{self.bits[choice[0, WEIGHT]]}A{self.bits[choice[0, ACTIVATION]]}"

    def bitops(self, choice: np.ndarray) -> int:
        chosen = self._bits[choice]
        return int(np.sum(bitops_of(self._macs, chosen[:, WEIGHT], chosen[:, ACTIVATION])))

    def effective_bits(self, bitops: int) -> float:
        """A cost in effective bits over the searched layers, the budget's unit."""
        return effective_bits_of(bitops, self.macs)

    def check_budget(self, objective: Objective) -> None:
        low, high = self.bitops_range
        total = self.macs
        reachable, side = (high, "above") if objective is Objective.WORST else (low, "below")  # nearest the budget's side
        if not objective.admits(reachable, self.budget.bitops):
            raise PtqauditError(
                f"budget of {self.budget.effective_bits(total):.2f} effective bits is {side} what --bits "
                f"{','.join(map(str, self.bits))} can reach ({effective_bits_of(reachable, total):.2f}): no policy qualifies"
            )

    def policy(self, choice: np.ndarray, name: str = "candidate") -> ResolvedPolicy:
        mapping = dict(self.base.mapping)
        for layer, (w, a) in zip(self.searched, choice):
            mapping[layer.name] = LayerQuant(self.bits[w], self.bits[a], self.base.mapping[layer.name].per_channel)
        return ResolvedPolicy(name, mapping, self.base.options)

    def project(self, choice: np.ndarray, objective: Objective) -> np.ndarray:
        """The nearest policy the budget admits, HAQ-style: while the cost is below the floor (worst) raise,
        or above the ceiling (best) lower, the one operand whose step changes the cost most, so the
        agent's choice is changed in as few places as possible."""
        choice = choice.copy()
        step = -objective.sign
        while not self.budget.admits(self.bitops(choice), objective):
            change = np.zeros(choice.shape)  # |BitOPs change| of moving each operand one step (-1: cannot move)
            for operand in (WEIGHT, ACTIVATION):
                other = self._bits[choice[:, 1 - operand]]
                target = choice[:, operand] + step
                movable = (target >= 0) & (target < len(self.bits))
                width_change = np.abs(self._bits[np.clip(target, 0, len(self.bits) - 1)] - self._bits[choice[:, operand]])
                change[:, operand] = np.where(movable, bitops_of(self._macs, width_change, other), -1)
            layer, operand = np.unravel_index(np.argmax(change), change.shape)
            if change[layer, operand] <= 0:
                raise PtqauditError("no policy within --bits meets the budget")  # check_budget prevents this
            choice[layer, operand] += step
        return choice


def layer_features(layers: list[Layer], weights: list[np.ndarray]) -> np.ndarray:
    """Per-layer state for the agent: depth, size, shape and weight statistics, each scaled to ~[0, 1]."""
    rows = []
    total = len(layers)
    for layer, w in zip(layers, weights):
        magnitude = np.abs(w)
        kernel = int(np.prod(layer.weight_shape[2:])) if layer.op_type == "Conv" else 1
        rows.append([
            layer.index / max(total - 1, 1),
            math.log10(layer.macs + 1) / 10,
            math.log10(layer.params + 1) / 8,
            float(layer.op_type == "Conv"), float(layer.op_type != "Conv"),
            math.log2(kernel + 1) / 5,
            math.log2(int(np.prod(layer.weight_shape)) // layer.output_channels + 1) / 12,  # fan-in per output
            math.log2(layer.output_channels + 1) / 12,
            float(magnitude.max() / (magnitude.std() + 1e-12)) / 20,  # outlier ratio: hurts low-bit weights
            float(np.mean(magnitude)) / (float(magnitude.max()) + 1e-12),
        ])
    return np.array(rows, dtype=np.float32)
