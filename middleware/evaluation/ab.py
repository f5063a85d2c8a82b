"""The A/B report: per variant, CTR, clicks, add-to-cart and conversion with confidence intervals, tests
against the control, a sample-ratio-mismatch check and a power warning. Pure functions over query records
and events (`middleware.events.model`); reading them is the caller's business.

What is measured, per variant (the variant a search was exposed to, from its query record):
- `ctr`: searches with at least one click / searches;
- `clicks_per_search`: clicks / searches;
- `add_to_cart_rate`: searches with at least one add-to-cart / searches;
- `conversion_rate`: purchases / searches.
An event counts when its query_id names an exposed search of the experiment and its object_id is among
the hits that search served; others are ignored and counted (`events_ignored`, `events_not_served`).

Searches of one unit (user or session) are correlated: a user who clicks once tends to click again. Treating
every search as independent understates the variance and makes differences look significant too often. So
the analysis is by unit: each metric is a ratio of per-unit sums, sum(X) / sum(N), and its variance comes
from the delta method over units, var = var(X - R·N) / (n · mean(N)²) (the sample variance over the n
units). The intervals are 95% (`alpha`): for the two per-search proportions (ctr, add_to_cart_rate) a
Wilson interval at the effective sample size R(1 - R) / var, which stays inside [0, 1] and behaves near 0;
for the two counts per search, R ± z·se, floored at 0. The test against the control (the experiment's first
variant) is a two-sided z-test of the difference with the two variances added (Welch-like, unpooled).
Several metrics and variants are tested at once: no correction for multiple comparisons is made.

Sample-ratio mismatch: a chi-square goodness-of-fit test of the units seen per variant against the
traffic split; p < 0.001 flags it (the assignment or the logging is broken, and the comparison is not to be
trusted). Units seen in more than one variant (the experiment changed while running) are left out of
everything and counted.

Power: for each metric, the units per variant needed to detect a relative change of `mde` over the
control's rate with a two-sided test at `alpha` and the given power, from the control's own per-unit
variance: n = (z_(1-alpha/2) + z_power)² · 2 · var_unit / (mde · R)²; a warning names the metrics whose
smallest variant has fewer units.

The normal and chi-square tails are computed with the standard library (math.erfc and the closed forms of
the regularised incomplete gamma function for integer degrees of freedom): the report needs no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from middleware.events.model import Event, QueryRecord
from middleware.experiments import Experiment

METRICS: tuple[str, ...] = ("ctr", "clicks_per_search", "add_to_cart_rate", "conversion_rate")
PROPORTIONS = frozenset({"ctr", "add_to_cart_rate"})  # at most one per search: Wilson intervals
SRM_ALPHA = 0.001


# ---------------------------------------------------------------------------------------- distributions


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """z with P(Z <= z) = p, by bisection on the normal tail (exact to about 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie strictly between 0 and 1, got {p}")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - normal_sf(mid) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for a chi-square X with integer `df` degrees of freedom (the regularised upper incomplete
    gamma function Q(df/2, x/2) in closed form, summed in log space so that large x do not overflow)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    if x <= 0.0:
        return 1.0
    half = x / 2.0
    if df % 2 == 0:  # Q = e^-h · sum_{i < df/2} h^i / i!
        total = sum(math.exp(-half + i * math.log(half) - math.lgamma(i + 1)) for i in range(df // 2))
    else:  # Q = erfc(√h) + e^-h · sum_{1 <= i <= (df-1)/2} h^(i-1/2) / Γ(i+1/2)
        total = math.erfc(math.sqrt(half))
        total += sum(
            math.exp(-half + (i - 0.5) * math.log(half) - math.lgamma(i + 0.5)) for i in range(1, (df - 1) // 2 + 1)
        )
    return min(1.0, max(0.0, total))


# ------------------------------------------------------------------------------------- textbook pieces


def wilson_interval(successes: float, n: float, alpha: float = 0.05) -> tuple[float, float]:
    """The Wilson score interval of a proportion (n may be an effective, non-integer sample size)."""
    if n <= 0:
        return (0.0, 1.0)
    z = normal_quantile(1.0 - alpha / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def two_proportion_z_test(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """(z, two-sided p) of p2 - p1 with the pooled variance: the textbook test for independent trials."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("both samples need at least one trial")
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    if se == 0.0:
        return (0.0, 1.0)
    z = (x2 / n2 - x1 / n1) / se
    return (z, 2.0 * normal_sf(abs(z)))


def sample_size_two_proportions(p1: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Trials per group to detect p1 → p1 · (1 + mde) with a two-sided test at `alpha` (Fleiss, without
    continuity correction)."""
    p2 = p1 * (1.0 + mde)
    if not (0.0 < p1 < 1.0 and 0.0 < p2 < 1.0) or p1 == p2:
        raise ValueError(f"need 0 < p1, p2 < 1 and an effect: p1={p1}, p2={p2}")
    za, zb = normal_quantile(1.0 - alpha / 2.0), normal_quantile(power)
    mean = (p1 + p2) / 2.0
    top = za * math.sqrt(2.0 * mean * (1.0 - mean)) + zb * math.sqrt(p1 * (1.0 - p1) + p2 * (1.0 - p2))
    return math.ceil(top * top / (p2 - p1) ** 2)


def srm_test(observed: list[int], traffic: list[float]) -> tuple[float, float]:
    """(chi-square, p) of observed counts against the shares in `traffic` (percentages or weights)."""
    total, weight = sum(observed), sum(traffic)
    if total == 0:
        return (0.0, 1.0)
    chi = sum((o - total * t / weight) ** 2 / (total * t / weight) for o, t in zip(observed, traffic, strict=True))
    return (chi, chi2_sf(chi, len(observed) - 1))


@dataclass(frozen=True)
class RatioEstimate:
    """sum(X) / sum(N) over units, with its delta-method standard error."""

    value: float
    se: float  # nan with fewer than two units
    units: int
    numerator: float
    denominator: float

    @property
    def unit_variance(self) -> float:
        """The variance one unit contributes (se² · units): what a power calculation scales."""
        return self.se * self.se * self.units


def ratio_estimate(pairs: list[tuple[float, float]]) -> RatioEstimate:
    """The ratio of sums of per-unit (X, N) pairs (N > 0) and its delta-method standard error."""
    n = len(pairs)
    sx = sum(x for x, _ in pairs)
    sn = sum(d for _, d in pairs)
    if n == 0 or sn == 0:
        return RatioEstimate(math.nan, math.nan, n, sx, sn)
    r = sx / sn
    if n < 2:
        return RatioEstimate(r, math.nan, n, sx, sn)
    resid = [x - r * d for x, d in pairs]
    mean_resid = sum(resid) / n  # 0 up to rounding
    var = sum((e - mean_resid) ** 2 for e in resid) / (n - 1)
    mean_n = sn / n
    return RatioEstimate(r, math.sqrt(var / n) / mean_n, n, sx, sn)


def compare(control: RatioEstimate, treatment: RatioEstimate) -> tuple[float, float | None]:
    """(z, two-sided p) of treatment − control with unpooled variances; p None when undefined."""
    se = math.sqrt(control.se**2 + treatment.se**2)
    diff = treatment.value - control.value
    if math.isnan(se) or math.isnan(diff):
        return (math.nan, None)
    if se == 0.0:
        return (0.0, 1.0) if diff == 0.0 else (math.copysign(math.inf, diff), None)
    z = diff / se
    return (z, 2.0 * normal_sf(abs(z)))


# ------------------------------------------------------------------------------------------- the report


@dataclass
class MetricResult:
    value: float | None
    ci_low: float | None
    ci_high: float | None
    se: float | None
    # against the control (None for the control itself)
    diff: float | None = None
    lift: float | None = None  # relative: diff / control
    z: float | None = None
    p_value: float | None = None


@dataclass
class VariantResult:
    name: str
    traffic: float
    units: int
    searches: int
    clicks: int
    add_to_carts: int
    purchases: int
    metrics: dict[str, MetricResult] = field(default_factory=dict)


@dataclass
class PowerCheck:
    metric: str
    baseline: float | None
    mde: float
    units_needed: int | None  # per variant
    units_present: int  # the smallest variant's
    enough: bool | None  # None: no baseline to size from


@dataclass
class ABReport:
    experiment: str
    unit: str
    control: str
    variants: list[VariantResult]
    srm_chi2: float
    srm_p: float
    srm: bool  # p < 0.001: the split is off
    power: list[PowerCheck]
    warnings: list[str]
    alpha: float
    searches_without_unit: int = 0
    units_in_several_variants: int = 0
    unknown_variant_searches: int = 0
    events_used: int = 0  # clicks, add-to-carts and purchases on served hits of exposed searches
    impressions: int = 0  # read and not used: the rates are per search
    events_ignored: int = 0  # not on an exposed search of this experiment
    events_not_served: int = 0  # on one, but for an object it did not serve

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


@dataclass
class _Unit:
    variant: str
    searches: int = 0
    clicked: int = 0
    clicks: int = 0
    carted: int = 0
    carts: int = 0
    purchases: int = 0


def _finite(value: Any) -> Any:
    """nan and inf as None, so that the report is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def report(
    experiment: Experiment,
    queries: Iterable[QueryRecord],
    events: Iterable[Event],
    *,
    mde: float = 0.05,
    alpha: float = 0.05,
    power: float = 0.8,
) -> ABReport:
    """The experiment's report from every query record and event (others' records are skipped)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie strictly between 0 and 1, got {power}")
    if not mde > 0.0:
        raise ValueError(f"mde must be positive (a relative change, e.g. 0.05), got {mde}")
    names = [v.name for v in experiment.variants]
    counts = _Counts()
    served: dict[str, tuple[str, frozenset[str]]] = {}  # query_id -> (unit, hit ids)
    units: dict[str, _Unit] = {}
    mixed: set[str] = set()
    for rec in queries:
        if rec.experiment != experiment.id:
            continue
        unit_id = rec.user_id if experiment.unit == "user" else rec.session_id
        if unit_id is None:
            counts.without_unit += 1
            continue
        if rec.variant not in names:
            counts.unknown_variant += 1
            continue
        unit = units.setdefault(unit_id, _Unit(rec.variant))
        if unit.variant != rec.variant:
            mixed.add(unit_id)
        unit.searches += 1
        served[rec.query_id] = (unit_id, frozenset(rec.hit_ids))
    per_search: dict[str, set[str]] = {}  # query_id -> actions seen on it
    for ev in events:
        found = served.get(ev.query_id)
        if found is None:
            counts.ignored += 1
            continue
        unit_id, hits = found
        if ev.object_id not in hits:
            counts.not_served += 1
            continue
        if ev.action == "impression":
            counts.impressions += 1
            continue
        counts.used += 1
        unit = units[unit_id]
        seen = per_search.setdefault(ev.query_id, set())
        if ev.action == "click":
            unit.clicks += 1
            unit.clicked += "click" not in seen
        elif ev.action == "add_to_cart":
            unit.carts += 1
            unit.carted += "add_to_cart" not in seen
        else:
            unit.purchases += 1
        seen.add(ev.action)
    for unit_id in mixed:
        del units[unit_id]

    z_ci = normal_quantile(1.0 - alpha / 2.0)
    by_variant: dict[str, list[_Unit]] = {name: [] for name in names}
    for unit in units.values():
        by_variant[unit.variant].append(unit)
    estimates = {name: _estimates(group) for name, group in by_variant.items()}
    variants: list[VariantResult] = []
    for variant in experiment.variants:
        group = by_variant[variant.name]
        result = VariantResult(
            name=variant.name,
            traffic=variant.traffic,
            units=len(group),
            searches=sum(u.searches for u in group),
            clicks=sum(u.clicks for u in group),
            add_to_carts=sum(u.carts for u in group),
            purchases=sum(u.purchases for u in group),
        )
        for metric in METRICS:
            est = estimates[variant.name][metric]
            result.metrics[metric] = _metric(metric, est, estimates[names[0]][metric], variant.name == names[0], z_ci)
        variants.append(result)

    chi, srm_p = srm_test([v.units for v in variants], [v.traffic for v in variants])
    smallest = min(v.units for v in variants)
    checks = [_power(metric, estimates[names[0]][metric], smallest, mde, alpha, power) for metric in METRICS]
    warnings = _warnings(srm_p, checks, mde, power, counts, len(mixed))
    return ABReport(
        experiment=experiment.id,
        unit=experiment.unit,
        control=names[0],
        variants=variants,
        srm_chi2=chi,
        srm_p=srm_p,
        srm=srm_p < SRM_ALPHA,
        power=checks,
        warnings=warnings,
        alpha=alpha,
        searches_without_unit=counts.without_unit,
        units_in_several_variants=len(mixed),
        unknown_variant_searches=counts.unknown_variant,
        events_used=counts.used,
        impressions=counts.impressions,
        events_ignored=counts.ignored,
        events_not_served=counts.not_served,
    )


@dataclass
class _Counts:
    without_unit: int = 0
    unknown_variant: int = 0
    used: int = 0
    impressions: int = 0
    ignored: int = 0
    not_served: int = 0


def _estimates(group: list[_Unit]) -> dict[str, RatioEstimate]:
    numerators = {
        "ctr": lambda u: u.clicked,
        "clicks_per_search": lambda u: u.clicks,
        "add_to_cart_rate": lambda u: u.carted,
        "conversion_rate": lambda u: u.purchases,
    }
    return {m: ratio_estimate([(float(f(u)), float(u.searches)) for u in group]) for m, f in numerators.items()}


def _metric(name: str, est: RatioEstimate, control: RatioEstimate, is_control: bool, z_ci: float) -> MetricResult:
    if math.isnan(est.value):
        return MetricResult(None, None, None, None)
    if math.isnan(est.se):
        low = high = None
    elif name in PROPORTIONS:
        # the Wilson interval at the effective sample size (the searches a unit-level variance is worth)
        var = est.se**2
        n_eff = est.value * (1.0 - est.value) / var if var > 0 else est.denominator
        alpha = 2.0 * normal_sf(z_ci)
        low, high = wilson_interval(est.value * n_eff, n_eff, alpha)
    else:
        low, high = max(0.0, est.value - z_ci * est.se), est.value + z_ci * est.se
    out = MetricResult(est.value, low, high, None if math.isnan(est.se) else est.se)
    if not is_control and not math.isnan(control.value):
        z, p = compare(control, est)
        out.diff = est.value - control.value
        out.lift = out.diff / control.value if control.value else None
        out.z, out.p_value = (None if math.isnan(z) else z), p
    return out


def _power(metric: str, control: RatioEstimate, present: int, mde: float, alpha: float, power: float) -> PowerCheck:
    baseline = None if math.isnan(control.value) else control.value
    if not baseline or math.isnan(control.se) or control.se == 0.0:
        return PowerCheck(metric, baseline, mde, None, present, None)
    za, zb = normal_quantile(1.0 - alpha / 2.0), normal_quantile(power)
    needed = math.ceil((za + zb) ** 2 * 2.0 * control.unit_variance / (mde * baseline) ** 2)
    return PowerCheck(metric, baseline, mde, needed, present, present >= needed)


def _warnings(
    srm_p: float, checks: list[PowerCheck], mde: float, power: float, counts: _Counts, mixed: int
) -> list[str]:
    out = []
    if srm_p < SRM_ALPHA:
        out.append(
            f"sample ratio mismatch (p = {srm_p:.2g}): the units per variant do not follow the traffic split; "
            "check the assignment and the logging before reading the results"
        )
    for check in checks:
        if check.enough is False:
            out.append(
                f"{check.metric}: {check.units_present} units per variant, {check.units_needed} needed to detect a "
                f"{mde:.0%} relative change at {power:.0%} power"
            )
        elif check.enough is None:
            out.append(f"{check.metric}: no baseline in the control yet, the sample cannot be sized")
    if mixed:
        out.append(f"{mixed} units were seen in more than one variant and are left out")
    if counts.without_unit:
        out.append(f"{counts.without_unit} exposed searches carry no unit id and are left out")
    return out


def format_report(rep: ABReport) -> str:
    """The report as text: one block per metric, the checks, then the warnings."""
    lines = [f"experiment {rep.experiment} (unit: {rep.unit}, control: {rep.control})", ""]
    lines.append(f"{'variant':<16}{'traffic':>8}{'units':>9}{'searches':>10}{'clicks':>9}{'carts':>8}{'purchases':>10}")
    for v in rep.variants:
        lines.append(
            f"{v.name:<16}{v.traffic:>7g}%{v.units:>9}{v.searches:>10}{v.clicks:>9}{v.add_to_carts:>8}{v.purchases:>10}"
        )
    level = f"{1 - rep.alpha:.0%}"
    for metric in METRICS:
        lines += ["", f"{metric}  ({level} CI; vs {rep.control}: lift, p)"]
        for v in rep.variants:
            m = v.metrics[metric]
            value = "-" if m.value is None else f"{m.value:.4f}"
            ci = "" if m.ci_low is None or m.ci_high is None else f"[{m.ci_low:.4f}, {m.ci_high:.4f}]"
            versus = ""
            if m.lift is not None:
                versus = f"{m.lift:+.1%}, p = {m.p_value:.3g}" if m.p_value is not None else f"{m.lift:+.1%}"
            lines.append(f"  {v.name:<16}{value:>8}  {ci:<20}  {versus}")
    lines += [
        "",
        f"sample ratio: chi-square {rep.srm_chi2:.3f}, p = {rep.srm_p:.3g}" + ("  MISMATCH" if rep.srm else ""),
    ]
    lines.append(
        f"events: {rep.events_used} used, {rep.impressions} impressions, {rep.events_ignored} on other searches, "
        f"{rep.events_not_served} for objects not served"
    )
    if rep.warnings:
        lines += ["", *(f"warning: {w}" for w in rep.warnings)]
    return "\n".join(lines)
