"""Search methods over static bit-width policies: policy-gradient RL, random, greedy and exhaustive."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn as nn

from ..errors import PtqauditError
from .evaluator import Leaderboard, SimEvaluator
from .sensitivity import sensitivity_prior
from .space import ACTIVATION, WEIGHT, Objective, SearchSpace

METHODS = ("rl", "random", "greedy", "exhaustive")
GROUP = 16  # policies scored per simulator pass (they share its input and common prefixes)
START_WEIGHT = 2.0  # logit added to the starting policy's widths: the first modes sit on a policy inside the budget


class PolicyNetwork(nn.Module):
    """Per-layer categorical distributions over weight and activation bits: a small MLP shared by all
    layers reads each layer's features (so layers alike start alike), plus a per-layer bias that
    starts at the sensitivity prior."""

    def __init__(self, features: torch.Tensor, prior: torch.Tensor, hidden: int = 32):
        super().__init__()
        self.features = features
        choices = prior.shape[-1]
        self.body = nn.Sequential(nn.Linear(features.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, 2 * choices))
        self.layer_bias = nn.Parameter(prior.clone())
        nn.init.zeros_(self.body[-1].weight)  # the MLP starts neutral: the prior alone sets the first samples
        nn.init.zeros_(self.body[-1].bias)

    def forward(self) -> torch.distributions.Categorical:
        logits = self.body(self.features).reshape(self.layer_bias.shape) + self.layer_bias
        return torch.distributions.Categorical(logits=logits)


class PolicyAgent:
    """The REINFORCE agent of the RL search, kept as an object so that a caller can alternate its steps
    with other work (distill trains the network between them). It starts from a per-layer sensitivity
    prior, centred on `start` when given (a policy inside the budget: the search's most extreme uniform
    one); each step samples `group` policies, projects them onto the budget and learns from
    reward = -accuracy (worst) or accuracy (best), standardized within the step. The policy's current
    mode is scored too (exploitation), outside the gradient."""

    def __init__(self, space: SearchSpace, features: np.ndarray, drop: np.ndarray, objective: Objective,
                 lr: float = 0.1, entropy_weight: float = 0.01, group: int = 8, start: np.ndarray | None = None):
        self.space, self.objective, self.group, self.entropy_weight = space, objective, group, entropy_weight
        prior = sensitivity_prior(drop, len(space.bits), objective)
        if start is not None:
            prior += START_WEIGHT * np.eye(len(space.bits), dtype=np.float32)[start]
        state = np.concatenate([features, drop / max(drop.max(), 1e-9)], axis=1).astype(np.float32)
        self.network = PolicyNetwork(torch.from_numpy(state), torch.from_numpy(prior))
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=lr)

    def sample(self, count: int) -> list[np.ndarray]:
        """Policies drawn from the agent's current distribution, projected onto the budget (no learning)."""
        with torch.no_grad():
            actions = self.network().sample((count,))
        return [self.space.project(a.numpy(), self.objective) for a in actions]

    def step(self, evaluator: SimEvaluator, board: Leaderboard, method: str = "rl") -> int:
        """Sample, score, offer to the board and learn; returns how many policies were requested. When the
        evaluator's cap cuts the group short, the agent learns from the samples scored (their rewards are
        standardized among themselves), and not at all from fewer than two."""
        distribution = self.network()
        actions = distribution.sample((self.group,))  # [group, layers, 2]
        log_prob = distribution.log_prob(actions).sum(dim=(1, 2))
        mode = distribution.probs.argmax(dim=-1)
        choices = [self.space.project(a.numpy(), self.objective) for a in list(actions) + [mode]]
        accuracies = evaluator.accuracies(choices, self.objective, method)
        board.offer(self.space, choices[: len(accuracies)], accuracies)
        scored = min(len(accuracies), self.group)
        if scored >= 2:
            rewards = torch.tensor([self.objective.sign * 100 * a for a in accuracies[:scored]])
            advantage = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
            loss = -(advantage * log_prob[:scored]).mean() - self.entropy_weight * distribution.entropy().sum()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return len(choices)


def rl_search(space: SearchSpace, evaluator: SimEvaluator, board: Leaderboard, objective: str, max_evaluations: int,
              seed: int, features: np.ndarray, progress, sensitivity: np.ndarray, start: np.ndarray | None = None,
              **_) -> None:
    """REINFORCE from a sensitivity prior ([layers, 2], search.sensitivity) centred on `start`; see PolicyAgent.
    Once the agent has converged (a step brings no policy not already scored), the rest of the cap goes to
    the leader's neighbourhood instead of to repeats."""
    torch.manual_seed(seed)
    agent = PolicyAgent(space, features, sensitivity, objective, start=start)
    run_agent(agent, evaluator, board, max_evaluations, np.random.default_rng(seed), progress)


def run_agent(agent: PolicyAgent, evaluator: SimEvaluator, board: Leaderboard, max_evaluations: int,
              rng: np.random.Generator, progress=lambda done, best: None, method: str = "rl") -> None:
    """rl_search's loop for an agent already made (and the torch generator as the caller left it): its steps
    until the evaluator has counted `max_evaluations` policies, the leader's neighbours once it has converged."""
    requests = 0
    while evaluator.evaluations < max_evaluations and requests < 4 * max_evaluations:
        before = evaluator.evaluations
        requests += agent.step(evaluator, board, method)
        if evaluator.evaluations == before and board.entries:
            requests += neighbour_step(agent.space, evaluator, board, agent.objective, rng, method=method)
        progress(evaluator.evaluations, board.best_accuracy)


def neighbour_step(space: SearchSpace, evaluator: SimEvaluator, board: Leaderboard, objective: Objective,
                   rng: np.random.Generator, count: int = 8, method: str = "rl") -> int:
    """Score `count` neighbours of the leading policy (one or two operands one width up or down, projected
    onto the budget) and offer them to the board; returns how many were requested."""
    leader = board.ranked[0].choice
    neighbours = []
    for _ in range(count):
        choice = leader.copy()
        for _ in range(rng.integers(1, 3)):
            layer, operand = rng.integers(len(space.searched)), rng.integers(2)
            choice[layer, operand] = np.clip(choice[layer, operand] + rng.choice((-1, 1)), 0, len(space.bits) - 1)
        neighbours.append(space.project(choice, objective))
    accuracies = evaluator.accuracies(neighbours, objective, method)
    board.offer(space, neighbours[: len(accuracies)], accuracies)
    return count


def random_search(space: SearchSpace, evaluator: SimEvaluator, board: Leaderboard, objective: str,
                  max_evaluations: int, seed: int, progress, **_) -> None:
    """Uniformly random bits per operand, projected onto the budget."""
    rng = np.random.default_rng(seed)
    requests = 0
    while evaluator.evaluations < max_evaluations and requests < 4 * max_evaluations:
        choices = [space.project(rng.integers(0, len(space.bits), size=(len(space.searched), 2)), objective)
                   for _ in range(GROUP)]
        accuracies = evaluator.accuracies(choices, objective, "random")
        board.offer(space, choices[: len(accuracies)], accuracies)
        requests += GROUP
        progress(evaluator.evaluations, board.best_accuracy)


def greedy_search(space: SearchSpace, evaluator: SimEvaluator, board: Leaderboard, objective: str,
                  max_evaluations: int, progress, **_) -> None:
    """From 8-bit-most everywhere, one operand one step down at a time, each time taking the step whose
    accuracy is lowest (worst) or highest (best), as long as the budget allows (worst: stop at the
    floor; best: go until under the ceiling, then stop)."""
    choice = space.uniform(len(space.bits) - 1)
    while evaluator.evaluations < max_evaluations:
        moves = []
        for layer, operand in itertools.product(range(len(space.searched)), (WEIGHT, ACTIVATION)):
            if choice[layer, operand] > 0:
                moved = choice.copy()
                moved[layer, operand] -= 1
                if objective is Objective.BEST or space.budget.admits(space.bitops(moved), objective):
                    moves.append(moved)
        if not moves:
            break
        accuracies = evaluator.accuracies(moves, objective, "greedy")
        moves = moves[: len(accuracies)]  # the cap may cut the last step's moves short
        scores = [board.key(a) for a in accuracies]
        admitted = [space.budget.admits(space.bitops(m), objective) for m in moves]
        board.offer(space, [m for m, ok in zip(moves, admitted) if ok], [a for a, ok in zip(accuracies, admitted) if ok])
        choice = moves[int(np.argmin(scores))]
        progress(evaluator.evaluations, board.best_accuracy)
        if objective is Objective.BEST and space.budget.admits(space.bitops(choice), objective):
            break


def exhaustive_search(space: SearchSpace, evaluator: SimEvaluator, board: Leaderboard, objective: str,
                      max_evaluations: int, progress, **_) -> None:
    """Every policy the budget admits, in an order that lets consecutive ones share their prefix. A space
    admitting more policies than --max-evaluations is refused rather than searched in part, since the
    answer would then not be exhaustive."""
    if space.size > max_evaluations * 50:
        raise PtqauditError(
            f"exhaustive search over {space.size:,} policies is too large (limit {max_evaluations * 50:,} with "
            f"--max-evaluations {max_evaluations}); use fewer --bits or --layers, or another --method"
        )
    admitted = list(_admitted(space, objective))
    if len(admitted) > max_evaluations:
        raise PtqauditError(
            f"exhaustive search of the {objective} case would score {len(admitted):,} policies (those the budget "
            f"admits), more than --max-evaluations {max_evaluations}; raise it, use fewer --bits or --layers, or "
            "another --method"
        )
    progress(evaluator.evaluations, None, len(admitted))  # the total, for the progress bar
    for start in range(0, len(admitted), 4 * GROUP):
        batch = admitted[start : start + 4 * GROUP]
        board.offer(space, batch, evaluator.accuracies(batch, objective, "exhaustive"))
        progress(evaluator.evaluations, board.best_accuracy)


def _admitted(space: SearchSpace, objective: Objective):
    """Every choice the budget admits, in an order that lets consecutive ones share their prefix."""
    shape = (len(space.searched), 2)
    for flat in itertools.product(range(len(space.bits)), repeat=2 * len(space.searched)):
        choice = np.array(flat, dtype=np.int64).reshape(shape)
        if space.budget.admits(space.bitops(choice), objective):
            yield choice


SEARCHES = {"rl": rl_search, "random": random_search, "greedy": greedy_search, "exhaustive": exhaustive_search}
