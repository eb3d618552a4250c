"""The cost model of a batch-size sweep: step time = a + b x batch, per backend.

`a` (ms) is what a step costs whatever its size: Python and framework overhead per op, kernel
launches, the optimizer's update of every weight; `b` (ms per example) is the work that grows
with the batch. Fitted by least squares over every timed run (repeats included), weighted by
1 / time^2: a timing's noise grows with it (a few percent of it), and sweeps space batches
geometrically, so unweighted the largest batch alone would set the line and `a` (the small
batches' cost) would come out as noise, even negative. The fit gives the standard errors of a
and b and the (weighted) R^2, so a reader sees when a line does not describe the timings
(R^2 well below 1: the cost is not linear in the batch over that range).

Two backends' lines cross at batch (a2 - a1) / (b1 - b2): below it the one with the smaller
`a` is faster, above it the one with the smaller `b`. `crossover_statement` says so only where
the crossing lies within (or near) the swept batches; beyond them it is an extrapolation.
"""

import dataclasses
import math

NEAR = 2.0  # a crossing up to this factor outside the swept range is named, as extrapolated
MIN_R2 = 0.9  # a line that describes its timings worse says nothing about where it crosses


@dataclasses.dataclass
class LineFit:
    a: float  # ms per step at batch 0
    b: float  # ms per example
    a_se: float | None  # standard errors (None with only two points: no residual left)
    b_se: float | None
    r2: float | None  # None when every timing is equal
    n: int  # timed runs fitted
    x_min: float  # the swept range
    x_max: float

    def step_ms(self, batch):
        return self.a + self.b * batch


def fit_line(batches, step_ms):
    """Weighted least-squares fit of step_ms = a + b x batch (weights 1 / step_ms^2: equal
    relative errors); None with fewer than two distinct batches (no line to fit)."""
    import numpy as np

    x = np.asarray(batches, dtype=float)
    y = np.asarray(step_ms, dtype=float)
    if len(x) != len(y) or len(set(x.tolist())) < 2 or not (y > 0).all():
        return None
    w = 1.0 / y**2
    design = np.stack([np.ones_like(x), x], axis=1)
    normal = design.T @ (w[:, None] * design)
    a, b = np.linalg.solve(normal, design.T @ (w * y))
    residual = y - (a + b * x)
    ss_res = float((w * residual**2).sum())
    mean = float((w * y).sum() / w.sum())
    ss_tot = float((w * (y - mean) ** 2).sum())
    n = len(x)
    a_se = b_se = None
    if n > 2:
        cov = ss_res / (n - 2) * np.linalg.inv(normal)
        a_se, b_se = math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1])
    return LineFit(a=float(a), b=float(b), a_se=a_se, b_se=b_se,
                   # Two runs fit any line: R^2 = 1 would say nothing.
                   r2=1.0 - ss_res / ss_tot if ss_tot > 0 and n > 2 else None, n=n,
                   x_min=float(x.min()), x_max=float(x.max()))


def crossover(fit1, fit2):
    """The batch at which the two lines cross; None when they are parallel."""
    if fit1.b == fit2.b:
        return None
    return (fit2.a - fit1.a) / (fit1.b - fit2.b)


def crossover_statement(name1, fit1, name2, fit2, near=NEAR):
    """One sentence on which backend is faster where, or None when the lines do not cross
    within `near` times the swept range (then one is faster throughout, which the table
    shows)."""
    x = crossover(fit1, fit2)
    lo, hi = min(fit1.x_min, fit2.x_min), max(fit1.x_max, fit2.x_max)
    if x is None or x <= 0 or not lo / near <= x <= hi * near:
        return None
    small, large = (name1, name2) if fit1.a < fit2.a else (name2, name1)
    where = ("" if lo <= x <= hi else
             f", outside the swept {lo:g}-{hi:g} (extrapolated)")
    return (f"{large} overtakes {small} at batch ~{_batch(x)}{where}: {small} is faster "
            f"below it (smaller fixed cost per step), {large} above it (smaller cost per "
            "example)")


def _batch(x):
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def crossovers(fits):
    """Statements for every pair of {name: LineFit} whose lines cross within (or near) the
    swept range, in the order given; how many pairs keep their order throughout; and the
    names left out, whose line fits its timings with R^2 < MIN_R2 or was fitted to two runs
    (no test of the line at all)."""
    names = [n for n, f in fits.items() if f is not None and (f.r2 or 0) >= MIN_R2]
    poor = [n for n, f in fits.items() if f is not None and n not in names]
    statements, same_order = [], 0
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            text = crossover_statement(first, fits[first], second, fits[second])
            if text:
                statements.append(text)
            else:
                same_order += 1
    return statements, same_order, poor
