"""The value check's decision rule (cache_store.value) and its replay in evaluation: pure."""

from __future__ import annotations

import math

import numpy as np

from cache_store.value import (
    ValueEstimate,
    ValueFigure,
    ValuePolicy,
    confidently_harmful,
    verdict,
)
from coprocessor_worker.serving_eval import protected

POLICY = ValuePolicy(min_contexts=10, z=1.645, tolerance=0.0)


def _estimate(deltas: list[float]) -> ValueEstimate:
    estimate = ValueEstimate()
    for d in deltas:
        estimate = estimate.add(d)
    return estimate


def test_estimate_mean_and_standard_error() -> None:
    estimate = _estimate([0.1, 0.2, 0.3, 0.4])
    assert math.isclose(estimate.mean, 0.25)
    assert math.isclose(estimate.std_error, float(np.std([0.1, 0.2, 0.3, 0.4], ddof=1) / 2))
    assert ValueEstimate().std_error == math.inf


def test_latents_are_not_served_before_there_is_evidence() -> None:
    few = _estimate([-0.5] * 9)
    result = verdict(few, few, POLICY)
    assert not result.serve and "not enough evidence" in result.reason


def test_consistent_help_is_served_and_harm_is_not() -> None:
    rng = np.random.default_rng(0)
    helps = _estimate(list(rng.normal(-0.05, 0.05, 40)))
    hurts = _estimate(list(rng.normal(+0.05, 0.05, 40)))
    noise = _estimate(list(rng.normal(0.0, 0.05, 40)))
    assert verdict(helps, helps, POLICY).serve
    assert not verdict(hurts, hurts, POLICY).serve
    # No evidence either way: the bound cannot show "no harm", so latents stay off ...
    assert not verdict(noise, noise, POLICY).serve
    # ... unless the operator accepts a small harm.
    lenient = ValuePolicy(min_contexts=10, tolerance=0.05)
    assert verdict(noise, noise, lenient).serve


def test_a_tenant_with_its_own_evidence_is_judged_on_it() -> None:
    rng = np.random.default_rng(1)
    overall_harm = _estimate(list(rng.normal(+0.1, 0.05, 100)))
    tenant_help = _estimate(list(rng.normal(-0.1, 0.05, 30)))
    tenant_new = _estimate([-0.1] * 3)
    assert verdict(tenant_help, overall_harm, POLICY).scope == "tenant"
    assert verdict(tenant_help, overall_harm, POLICY).serve
    judged_globally = verdict(tenant_new, overall_harm, POLICY)
    assert judged_globally.scope == "global" and not judged_globally.serve


def test_value_check_off_serves_everything() -> None:
    off = ValuePolicy(enabled=False)
    hurts = _estimate([1.0] * 50)
    assert verdict(hurts, hurts, off).serve
    assert not confidently_harmful(ValueFigure(5.0, 0.01, 20), off)


def test_single_context_declined_only_when_confidently_harmful() -> None:
    assert confidently_harmful(ValueFigure(0.5, 0.1, 26), POLICY)
    assert not confidently_harmful(ValueFigure(0.2, 0.1, 26), POLICY)  # within noise
    assert not confidently_harmful(ValueFigure(-0.5, 0.1, 26), POLICY)
    assert not confidently_harmful(None, POLICY)


def test_protected_replay_serves_in_stream_order() -> None:
    policy = ValuePolicy(min_contexts=3, tolerance=0.0)
    figures = [ValueFigure(-0.1 + 0.001 * i, 0.05, 20) for i in range(6)]
    figures.insert(4, ValueFigure(2.0, 0.05, 20))  # one confidently harmful context
    served = protected(figures, policy)
    # Off until 3 figures are in; then on, except the harmful context itself, and the
    # estimate it drags up past the bound.
    assert served[:2].tolist() == [False, False]
    assert bool(served[2]) and bool(served[3])
    assert not served[4]
