"""How much each operand of each searched layer matters: the prior the RL search starts from.

Two estimates of what an operand costs at the lowest width, everything else at the top width:
- "gradient" (the default): one forward and backward pass of the simulator in float over a few batches
  gives every operand's gradient at once; the loss change its quantization error causes is estimated to
  first order per batch (g . delta, as HAWQ-style and Fisher-based methods do) and its root mean square
  over the batches is the score. It costs no policy evaluations, whatever the depth.
- "probes": one policy per operand at the lowest width, scored like any candidate: 2 evaluations per
  layer plus a reference, counted against --max-evaluations.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from ..arithmetic import activation_scale_zero_point, centered_activation_codes, weight_codes
from ..data import Dataset
from ..predictions import drop_points
from ..sim.engine import simulation_plan
from ..sim.model import SimModel
from .evaluator import Leaderboard, SimEvaluator
from .space import ACTIVATION, WEIGHT, Objective, SearchSpace

SENSITIVITY_METHODS = ("gradient", "probes")
GRADIENT_IMAGES = 256  # images the gradient estimate reads (more changes the ranking little, measured on ResNet-20)
GRADIENT_BATCH = 32  # images per backward pass: the estimate's unit of variation


def probe_sensitivity(space: SearchSpace, evaluator: SimEvaluator, objective: Objective,
                      board: Leaderboard | None = None) -> np.ndarray:
    """Accuracy lost, in points, when one operand of one layer alone drops from the top width to the
    lowest (everything else at the top width): 2 evaluations per searched layer, [layers, 2]. Probes the
    budget admits are offered to `board`: they are candidates like any other. Where the evaluator's cap
    leaves no room for a probe, its operand counts as insensitive (0)."""
    top = space.uniform(len(space.bits) - 1)
    probes = []
    for layer, operand in itertools.product(range(len(space.searched)), (WEIGHT, ACTIVATION)):
        probe = top.copy()
        probe[layer, operand] = 0
        probes.append(probe)
    drop = np.zeros(len(probes))
    scored = evaluator.accuracies([top] + probes, objective, "sensitivity")
    if len(scored) > 1:
        reference, *dropped = scored
        drop[: len(dropped)] = np.maximum(drop_points(reference, np.array(dropped)), 0)
        if board is not None:
            admitted = [i for i in range(len(dropped)) if space.budget.admits(space.bitops(probes[i]), objective)]
            board.offer(space, [probes[i] for i in admitted], [dropped[i] for i in admitted])
    return drop.reshape(len(space.searched), 2)


def gradient_sensitivity(space: SearchSpace, sim: SimModel, dataset: Dataset, batch_size: int,
                         images: int = GRADIENT_IMAGES) -> np.ndarray:
    """Estimated loss change when one operand of one layer drops to the lowest width, [layers, 2]: the
    root mean square over batches of sum(gradient * quantization error), from the float model's
    cross-entropy on `images` examples of `dataset`. Activation ranges are measured as the deployment
    measures them (per input at batch size 1, over the batch otherwise)."""
    lowest = space.bits[0]
    per_sample = simulation_plan(batch_size)[0] == "sample"
    layers = [sim.quant_layer(layer.name) for layer in space.searched]
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        x = args[0]
        if not x.is_floating_point():  # token ids: nothing to quantize there
            return None
        if not x.requires_grad:  # computed from constants only (a text model's embeddings): a leaf of its own
            x = x.detach().requires_grad_(True)
        x.retain_grad()
        inputs[module.name] = x
        return (x, *args[1:])

    # the weight's error does not change between batches: only its gradient does
    weight_errors = [_weight_error(layer, lowest, space.base.mapping[searched.name].per_channel)
                     for layer, searched in zip(layers, space.searched)]
    hooks = [layer.register_forward_pre_hook(keep_input) for layer in layers]
    squares = np.zeros((len(layers), 2))
    batches = 0
    was_training = sim.training
    sim.eval()
    try:
        with torch.enable_grad():
            for x, y in dataset.subset(min(images, len(dataset))).batches(GRADIENT_BATCH):
                x = torch.from_numpy(x).to(sim.device).requires_grad_(True) if not dataset.is_text else sim.feed(x)
                sim.zero_grad(set_to_none=True)
                loss = F.cross_entropy(sim(x), torch.from_numpy(y).to(sim.device))
                loss.backward()
                for i, (layer, weight_error) in enumerate(zip(layers, weight_errors)):
                    squares[i, WEIGHT] += float((layer.weight.grad * weight_error).sum()) ** 2
                    squares[i, ACTIVATION] += _activation_term(inputs[layer.name], lowest, per_sample,
                                                               layer.nonnegative_input) ** 2
                batches += 1
    finally:
        for hook in hooks:
            hook.remove()
        sim.zero_grad(set_to_none=True)
        sim.train(was_training)
    return np.sqrt(squares / max(batches, 1))


def _weight_error(layer, bits: int, per_channel: bool) -> torch.Tensor:
    """dequantized w - w for this layer's weight at `bits`."""
    with torch.no_grad():
        codes, scale = weight_codes(layer.weight, bits, layer.kind.scale_axis(per_channel))
        return codes * scale - layer.weight


def _activation_term(x: torch.Tensor, bits: int, per_sample: bool, nonnegative: bool) -> float:
    """sum(dL/dx * (dequantized x - x)) for a layer's input at `bits`."""
    with torch.no_grad():
        scale, zero_point = activation_scale_zero_point(x, bits, per_sample, nonnegative)
        error = centered_activation_codes(x, scale, zero_point, bits, nonnegative) * scale - x
        return float((x.grad * error).sum())


def sensitivity_prior(drop: np.ndarray, choices: int, objective: Objective, strength: float = 3.0) -> np.ndarray:
    """Initial logits [layers, 2, choices]: where an operand is sensitive, the worst case leans to its low
    widths and the best case to its high ones; insensitive operands start uniform."""
    scaled = drop / max(drop.max(), 1e-9)
    ramp = np.linspace(0.0, 1.0, choices)  # 0 at the lowest width, 1 at the highest
    return (objective.sign * strength * scaled[:, :, None] * ramp[None, None, :]).astype(np.float32)
