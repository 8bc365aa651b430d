"""Kernel-family detection against an independent probe of ONNX Runtime (tests/conftest.py), the bound
that decides where the saturating arithmetic is needed, and the family stated in results."""

from __future__ import annotations

import itertools
import json

import numpy as np
import torch

from ptqaudit.kernels import KERNEL_FAMILIES, cpu_description, detect_kernel_family, largest_pair_sum
from test_cli import run_cli


def test_detected_family_is_the_one_ort_computes(ort_kernel_family):
    assert detect_kernel_family() == ort_kernel_family
    assert detect_kernel_family() in KERNEL_FAMILIES


def _largest_pair_sum_by_enumeration(codes: np.ndarray, bits: int) -> int:
    padded = np.vstack([codes, np.zeros((len(codes) % 2, codes.shape[1]), dtype=codes.dtype)])
    return max(abs(a1 * padded[2 * p, n] + a2 * padded[2 * p + 1, n])
               for p, n in itertools.product(range(len(padded) // 2), range(codes.shape[1]))
               for a1, a2 in itertools.product(range(2**bits), repeat=2))


def test_pair_sum_bound_holds_by_enumeration():
    """No pair of activation codes gives a larger pair sum than the bound (odd K: the last code pairs with a
    padded zero), and with same-signed weights the bound is reached."""
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        codes = rng.integers(-127, 128, (5, 3))
        bound = largest_pair_sum(torch.from_numpy(codes).float(), bits)
        assert bound >= _largest_pair_sum_by_enumeration(codes, bits)
        same_signed = np.abs(codes)
        assert largest_pair_sum(torch.from_numpy(same_signed).float(), bits) == \
            _largest_pair_sum_by_enumeration(same_signed, bits)


def test_cpu_description_names_the_hardware():
    assert cpu_description().strip()


def test_eval_and_run_folders_state_the_kernel_family(ort_kernel_family, tiny_digits_model, tmp_path, capsys):
    """What ORT computes depends on the CPU, so every result says which arithmetic it came from."""
    code, out, _ = run_cli(capsys, "eval", tiny_digits_model, "-p", "w8a8", "--limit", "20", "--no-progress", "--json")
    assert code == 0 and json.loads(out)["kernel_family"] == ort_kernel_family
    code, out, _ = run_cli(capsys, "eval", tiny_digits_model, "-p", "w8a8", "--limit", "20", "--no-progress")
    assert code == 0 and f"(integer kernels: {ort_kernel_family})" in out
    run = tmp_path / "run"
    code, _, _ = run_cli(capsys, "search", tiny_digits_model, "--objective", "worst", "--method", "random",
                         "--max-evaluations", "4", "--limit", "20", "--verify-top", "1", "--no-progress", "-o", run)
    assert code == 0
    assert json.loads((run / "run.json").read_text())["environment"]["kernel_family"] == ort_kernel_family
