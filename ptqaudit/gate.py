"""The release gate: thresholds on an accuracy drop and an accuracy, checked, reported and enforced (exit 1)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GateFailed
from .predictions import comparable_points, drop_points


@dataclass
class Check:
    """One threshold of the gate against its figure."""

    name: str
    figure: str
    value: float
    threshold: float
    passed: bool
    message: str  # what a failure says


@dataclass
class GateResult:
    max_drop: float | None
    min_accuracy: float | None
    checks: list[Check]
    verdict: str  # pass, fail, or not gated (no threshold set)


@dataclass(frozen=True)
class Gate:
    """Release thresholds on the worst case: its drop from FP32 (points) and its accuracy (percent)."""

    max_drop: float | None = None
    min_accuracy: float | None = None

    @property
    def is_set(self) -> bool:
        return self.max_drop is not None or self.min_accuracy is not None

    def checks(self, fp32: float, worst: float, subject: str = "worst-case") -> list[Check]:
        """One check per threshold set, of `subject`'s accuracy `worst` (the worst case, or a policy)."""
        drop = drop_points(fp32, worst)
        checks = []
        if self.max_drop is not None:
            measured = "worst case" if subject == "worst-case" else "quantized"
            checks.append(Check(f"{subject} drop <= {self.max_drop:g} points", f"{subject} drop", drop, self.max_drop,
                                comparable_points(drop) <= self.max_drop,
                                f"{subject} drop {drop:.2f} points exceeds --max-drop {self.max_drop:g} "
                                f"(fp32 {100 * fp32:.2f}%, {measured} {100 * worst:.2f}%)"))
        if self.min_accuracy is not None:
            checks.append(Check(f"{subject} accuracy >= {self.min_accuracy:g}%", f"{subject} accuracy", 100 * worst,
                                self.min_accuracy, comparable_points(100 * worst) >= self.min_accuracy,
                                f"{subject} accuracy {100 * worst:.2f}% is below --min-accuracy {self.min_accuracy:g}%"))
        return checks

    def result(self, fp32: float, worst: float, subject: str = "worst-case") -> GateResult:
        checks = self.checks(fp32, worst, subject)
        verdict = "not gated" if not checks else "pass" if all(c.passed for c in checks) else "fail"
        return GateResult(self.max_drop, self.min_accuracy, checks, verdict)

    def failure(self, fp32: float, worst: float, subject: str = "worst-case") -> str | None:
        """The one line naming every failing figure, or None when `subject` passes."""
        failed = [c.message for c in self.checks(fp32, worst, subject) if not c.passed]
        return "gate failed: " + "; ".join(failed) if failed else None

    def enforce(self, fp32: float, worst: float, subject: str = "worst-case") -> list[Check]:
        """The gate as commands apply it: GateFailed (exit 1) naming every failing figure, else the checks."""
        failure = self.failure(fp32, worst, subject)
        if failure is not None:
            raise GateFailed(failure)
        return self.checks(fp32, worst, subject)
