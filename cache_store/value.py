"""The value check's figures and the decision made from them (DESIGN §4.7b).

A worker measures, per context, whether its latents help on the context's own tail: the
mean change of the decoder's NLL (nats per token; negative = latents help) over a few scored
tokens, with its standard error. One context's figure is mostly noise around a systematic
effect (measured correlation with the served effect about 0), so the decision to serve
latents rests on a running estimate over many contexts, per tenant and globally, kept in the
store where every worker and server shares it:

- latents are served for a tenant only while the upper confidence bound of the estimate
  (the tenant's own once it has `min_contexts` figures, else the global one) shows no harm
  beyond `tolerance`; before there is enough evidence they are not served;
- a single context whose own figure is confidently harmful is declined outright.

This module is pure logic; both the worker and the server apply it, so the rule has one copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ValueFigure:
    """One context's measured effect of its latents on its own tail."""

    delta: float
    """Mean NLL change with latents minus without, nats per scored token (< 0: they help)."""
    std_error: float
    """Standard error of `delta` over the scored tokens."""
    tokens: int
    """How many tokens were scored."""

    @property
    def relative_change(self) -> float:
        """Perplexity change on the scored tokens: exp(delta) - 1."""
        return math.expm1(self.delta)


@dataclass(frozen=True, slots=True)
class ValueEstimate:
    """Running sums of per-context deltas: enough for a mean and its standard error."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, delta: float) -> ValueEstimate:
        return ValueEstimate(self.n + 1, self.total + delta, self.total_sq + delta * delta)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def std_error(self) -> float:
        if self.n < 2:
            return math.inf
        variance = max(0.0, (self.total_sq - self.n * self.mean**2) / (self.n - 1))
        return math.sqrt(variance / self.n)

    def upper(self, z: float) -> float:
        """Upper confidence bound of the mean delta (nats)."""
        return self.mean + z * self.std_error

    def lower(self, z: float) -> float:
        return self.mean - z * self.std_error


@dataclass(frozen=True, slots=True)
class ValuePolicy:
    """When latents are served. Defaults: serve only on evidence of no harm."""

    enabled: bool = True
    """False: serve every published payload (the value check's figures are still recorded)."""
    min_contexts: int = 20
    """Figures needed before an estimate is trusted (a tenant's own, else the global one)."""
    z: float = 1.645
    """One-sided 95% bound on the running estimate."""
    tolerance: float = 0.0
    """Largest perplexity change (e.g. 0.005 = +0.5%) the bound may show while serving."""
    context_z: float = 2.576
    """A single context is declined when its own figure's lower 99.5% bound shows harm."""


@dataclass(frozen=True, slots=True)
class Verdict:
    serve: bool
    reason: str
    estimate: ValueEstimate
    scope: str
    """"tenant" or "global": whose estimate decided."""


def verdict(tenant: ValueEstimate, overall: ValueEstimate, policy: ValuePolicy) -> Verdict:
    """Whether to serve latents to a tenant, from its running estimate and the global one."""
    scope, estimate = ("tenant", tenant) if tenant.n >= policy.min_contexts else ("global", overall)
    if not policy.enabled:
        return Verdict(True, "value check off", estimate, scope)
    if estimate.n < policy.min_contexts:
        return Verdict(
            False,
            f"not enough evidence yet: {estimate.n} of {policy.min_contexts} contexts measured",
            estimate,
            scope,
        )
    bound = math.expm1(estimate.upper(policy.z))
    if bound > policy.tolerance:
        return Verdict(
            False,
            f"{scope} estimate {math.expm1(estimate.mean):+.2%} per token, upper bound "
            f"{bound:+.2%} > {policy.tolerance:+.2%} over {estimate.n} contexts",
            estimate,
            scope,
        )
    return Verdict(
        True,
        f"{scope} estimate {math.expm1(estimate.mean):+.2%}, upper bound {bound:+.2%}",
        estimate,
        scope,
    )


def confidently_harmful(figure: ValueFigure | None, policy: ValuePolicy) -> bool:
    """A context whose own figure shows harm even at its lower bound."""
    if figure is None or not policy.enabled or figure.tokens < 2:
        return False
    return figure.delta - policy.context_z * figure.std_error > 0
