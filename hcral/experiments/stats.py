"""Small-sample statistics for the experiment tables: mean, standard deviation, paired differences
and their Student-t 95% confidence interval.

No SciPy: the t quantile is the numeric inverse of the t distribution's CDF, written with the
regularised incomplete beta function (its continued fraction, evaluated with the modified Lentz
method; Press et al., *Numerical Recipes*, 3rd ed., §6.4). Known values it reproduces:
``t_{0.975, 1} = 12.706``, ``t_{0.975, 2} = 4.303``, ``t_{0.975, 4} = 2.776``, and 1.960 as
``df -> ∞``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "PairedDiff", "format_ci", "mean", "paired_difference", "std", "student_t_cdf", "student_t_quantile",
]  # fmt: skip

# Continued-fraction and bisection controls: relative accuracy far below the 3 decimals reported.
_CF_MAX_ITERS = 300
_CF_EPS = 1e-15
_CF_TINY = 1e-300
_BISECT_ITERS = 200


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for no values."""
    return math.fsum(values) / len(values) if len(values) else math.nan


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1); NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
    h = d
    for m in range(1, _CF_MAX_ITERS + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _CF_TINY else _CF_TINY
            h *= d * c
        if abs(d * c - 1.0) < _CF_EPS:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast for x < (a + 1)/(a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df > 0`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"student_t_cdf: df must be > 0, got {df!r}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with ``P(T <= t) = p`` for Student's t with ``df > 0`` degrees of freedom (bisection)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"student_t_quantile: p must be in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"student_t_quantile: df must be > 0, got {df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:  # bracket: heavy tails at df < 1 need a wide interval
        lo, hi = hi, hi * 2.0
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedDiff:
    """Paired difference ``treatment - baseline`` over the seeds both have.

    ``diffs`` maps seed -> difference; ``mean``/``std`` are over them; ``[ci_low, ci_high]`` is the
    two-sided ``confidence`` t-interval ``mean ± t_{(1+confidence)/2, n-1} · std / sqrt(n)``
    (NaN for fewer than two pairs).
    """

    diffs: dict[int, float]
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2.0


def paired_difference(
    treatment: Mapping[int, float], baseline: Mapping[int, float], *, confidence: float = 0.95
) -> PairedDiff:
    """Per-seed differences ``treatment[s] - baseline[s]`` over common seeds, with a t-interval.

    Seeds present in only one of the two (a failed or missing run) are left out of the pairs.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_difference: confidence must be in (0, 1), got {confidence!r}")
    seeds = sorted(set(treatment) & set(baseline))
    diffs = {s: float(treatment[s]) - float(baseline[s]) for s in seeds}
    values = list(diffs.values())
    m, s = mean(values), std(values)
    if len(values) >= 2:
        half = student_t_quantile((1.0 + confidence) / 2.0, len(values) - 1) * s / math.sqrt(len(values))
        low, high = m - half, m + half
    else:
        low = high = math.nan
    return PairedDiff(diffs, m, s, low, high, confidence)


def format_ci(d: PairedDiff, *, scale: float = 1.0, digits: int = 2) -> str:
    """``+m [+lo, +hi]`` of ``d`` times ``scale``, with `` *`` when the interval excludes 0;
    ``+m (n=1)`` for a single pair and ``–`` for none."""
    if d.n == 0 or math.isnan(d.mean):
        return "–"
    if math.isnan(d.ci_low):
        return f"{d.mean * scale:+.{digits}f} (n={d.n})"
    sig = " *" if d.ci_low > 0 or d.ci_high < 0 else ""
    return f"{d.mean * scale:+.{digits}f} [{d.ci_low * scale:+.{digits}f}, {d.ci_high * scale:+.{digits}f}]{sig}"
