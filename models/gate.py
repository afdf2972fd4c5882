"""The promotion gate every retrain job shares: a new version replaces the current one only
if it fixes at least `min_fixed` of the failures that fired its job (measured on failures it
did not train on, where the job can hold some out) and its own held-out evaluation is no
worse than the current version's. Each job measures both; this decides and says why."""

from __future__ import annotations

from typing import Sequence


def promotion(needed: int, fixed: int, regressions: Sequence[str], min_fixed: float,
              what: str = "failures") -> tuple[bool, str]:
    """(promote?, why). `needed`: measured failures the current version still has; `fixed`:
    how many of them the new version no longer has; `regressions`: held-out measures that
    got worse beyond their tolerance, each as a sentence."""
    if needed == 0:
        return False, f"the current version already passes every measured {what}: nothing to fix"
    share = fixed / needed
    if share < min_fixed:
        return False, f"fixes {share:.0%} of {needed} {what} (< {min_fixed:.0%})"
    if regressions:
        return False, "worse on its held-out evaluation: " + "; ".join(regressions)
    return True, f"fixes {share:.0%} of {needed} {what}; no worse on its held-out evaluation"
