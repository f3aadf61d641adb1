"""Rank selection from a singular-value spectrum: EVBMF, an energy fraction, rounding.

EVBMF (empirical variational Bayesian matrix factorization) follows Nakajima, Sugiyama, Babacan and
Tomioka, *Global analytic solution of fully-observed variational Bayesian matrix factorization*, JMLR 14
(2013): its analytic EVB solution with the noise variance unknown and estimated. For an ``L x M``
observation (``L <= M``, ``alpha = L / M``) with singular values ``gamma_h``:

* the EVB solution keeps component ``h`` iff ``gamma_h > gamma_evb = sqrt(M * sigma2 * x_bar)``, with
  ``x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)`` and ``tau_bar`` the zero of
  ``Phi(tau) + Phi(tau / alpha)``, ``Phi(z) = log(z + 1) / z - 1/2`` (``tau_bar = 2.5129`` for a square
  matrix; the widely copied approximation ``2.5129 * sqrt(alpha)`` is not needed: we solve for it);
* the noise variance ``sigma2`` minimises the free energy
  ``Omega(sigma2) = sum_h psi(gamma_h^2 / (M sigma2))`` with ``psi(x) = x - log x`` below ``x_bar`` and
  ``psi(x) = x - log x + log(tau + 1) + alpha log(tau / alpha + 1) - tau`` above it
  (``tau = tau(x) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2``), over the interval the paper
  bounds it to: ``[max(gamma_{H+1}^2 / (M x_bar), sum_{h>H} gamma_h^2 / (M (L - H))), ||Y||^2 / (L M)]``
  with ``H = ceil(L / (1 + alpha)) - 1``.

The minimisation is ours (numpy only): the free energy (constants dropped, so zero singular values are
harmless) on a 256-point logarithmic grid over the interval, then golden-section search in the grid cell
pair around the best point. Working in ``log sigma2`` makes the search independent of the weights' scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["EvbmfResult", "evbmf", "evbmf_rank", "energy_rank", "energy_kept", "round_rank", "tau_bar"]


def _phi(z: np.ndarray | float) -> np.ndarray | float:
    return np.log1p(z) / z - 0.5


def tau_bar(alpha: float) -> float:
    """The zero of ``Phi(tau) + Phi(tau / alpha)`` (decreasing in ``tau`` from 1 to -1), by bisection."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha: got {alpha!r}; allowed: 0 < alpha <= 1 (L / M with L <= M)")
    f = lambda t: _phi(t) + _phi(t / alpha)  # noqa: E731
    lo, hi = 1e-12, 1.0
    while f(hi) > 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class EvbmfResult:
    """EVBMF's answer: the rank, the estimated noise variance and the singular-value threshold."""

    rank: int
    sigma2: float
    threshold: float
    x_bar: float


def _omega(log_sigma2: np.ndarray, s2: np.ndarray, total: float, L: int, M: int, alpha: float,
           x_bar: float) -> np.ndarray:
    """The free energy (times L, constants dropped) at each ``log sigma2`` of a 1-D array.

    ``sum_h (x_h - log x_h)`` is ``total / (M sigma2) + L log sigma2`` up to a constant (the truncated
    components included), so only the above-threshold correction needs the singular values one by one.
    """
    out = np.empty(len(log_sigma2))
    step = max(1, 2_000_000 // max(s2.size, 1))
    for i in range(0, len(log_sigma2), step):
        g = log_sigma2[i:i + step]
        sigma2 = np.exp(g)[:, None]
        x = s2[None, :] / (M * sigma2)
        above = x > x_bar
        d = np.where(above, x, x_bar + 1.0) - (1.0 + alpha)  # finite where unused
        tau = 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))
        psi1 = np.where(above, np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau, 0.0)
        out[i:i + step] = total / (M * sigma2[:, 0]) + L * g + psi1.sum(axis=1)
    return out


def evbmf(singular_values: Sequence[float] | np.ndarray, shape: tuple[int, int], *,
          frobenius2: float | None = None, sigma2: float | None = None) -> EvbmfResult:
    """EVBMF rank of a matrix from its singular values (largest first or not: they are sorted here).

    Args:
        singular_values: the matrix's singular values, all ``min(shape)`` of them, or the leading ones when
            ``frobenius2`` is given.
        shape: the matrix shape (either orientation).
        frobenius2: the squared Frobenius norm when only leading singular values are given (the remainder
            is the energy of the missing ones).
        sigma2: a known noise variance (skips the estimation).

    Returns an :class:`EvbmfResult`; ``rank`` may be 0 (nothing distinguishable from noise).
    """
    s = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64)).ravel())[::-1]
    L, M = sorted(int(d) for d in shape)
    if L < 1:
        raise ValueError(f"shape: got {shape!r}; allowed: both dimensions >= 1")
    H = len(s)
    if H == 0 or H > L:
        raise ValueError(f"singular_values: got {H}; allowed: 1..{L} values for a {shape[0]}x{shape[1]} matrix")
    s2 = s * s
    total = float(s2.sum()) if frobenius2 is None else float(frobenius2)
    if total < float(s2.sum()) * (1 - 1e-9):
        raise ValueError(f"frobenius2: got {frobenius2!r}; allowed: at least the sum of the squared singular "
                         f"values ({float(s2.sum()):g})")
    if total <= 0.0:
        return EvbmfResult(0, 0.0, 0.0, float("nan"))
    alpha = L / M
    t = tau_bar(alpha)
    x_bar = (1.0 + t) * (1.0 + alpha / t)
    residual = total - float(s2.sum())
    if sigma2 is None:
        h_bar = min(max(math.ceil(L / (1.0 + alpha)) - 1, 0), H - 1)  # components that can be signal
        tail = np.concatenate([s2[h_bar:], [residual / max(L - H, 1)] * (L - H)]) if L > H else s2[h_bar:]
        lower = max(s2[h_bar] / (M * x_bar), float(tail.mean()) / M)
        upper = total / (L * M)
        lower = min(max(lower, upper * 1e-12), upper)
        if upper <= lower * (1 + 1e-12):
            sigma2 = upper
        else:
            grid = np.linspace(math.log(lower), math.log(upper), 256)
            i = int(np.argmin(_omega(grid, s2, total, L, M, alpha, x_bar)))
            a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
            sigma2 = math.exp(_golden(lambda g: float(_omega(np.array([g]), s2, total, L, M, alpha, x_bar)[0]), a, b))
    threshold = math.sqrt(M * sigma2 * x_bar)
    return EvbmfResult(int((s > threshold).sum()), float(sigma2), threshold, x_bar)


def _golden(f, a: float, b: float, iterations: int = 80) -> float:
    """Minimise ``f`` on ``[a, b]`` by golden-section search; returns the argmin."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    best_x, best_f = (c, fc) if fc <= fd else (d, fd)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
        for x, fx in ((c, fc), (d, fd)):
            if fx < best_f:
                best_x, best_f = x, fx
        if abs(b - a) < 1e-12:
            break
    for x in (a, b):  # the bracket ends (grid points) may be the minimum themselves
        fx = f(x)
        if fx < best_f:
            best_x, best_f = x, fx
    return best_x


def evbmf_rank(singular_values: Sequence[float] | np.ndarray, shape: tuple[int, int]) -> int:
    """Just the EVBMF rank (see :func:`evbmf`)."""
    return evbmf(singular_values, shape).rank


def energy_kept(singular_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """``out[r-1]``: the fraction of the squared singular values the leading ``r`` keep (``r = 1..n``)."""
    s = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64)).ravel())[::-1]
    c = np.cumsum(s * s)
    return c / c[-1] if c.size and c[-1] > 0 else np.ones_like(c)


def energy_rank(singular_values: Sequence[float] | np.ndarray, energy: float) -> int:
    """The smallest rank whose leading singular values keep at least ``energy`` of the sum of squares (>= 1)."""
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy: got {energy!r}; allowed: 0 <= energy <= 1")
    kept = energy_kept(singular_values)
    if kept.size == 0:
        raise ValueError("singular_values: empty")
    # tolerate rounding in the cumulative sum: 0.9 of a spectrum whose first value holds exactly 0.9
    r = int(np.searchsorted(kept, energy - 1e-12, side="left")) + 1
    return max(1, min(r, kept.size))


def round_rank(rank: int, multiple: int, full: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, at least 1 and never above ``full``."""
    if multiple < 1:
        raise ValueError(f"multiple: got {multiple!r}; allowed: >= 1")
    r = max(1, int(rank))
    r = -(-r // multiple) * multiple
    return max(1, min(r, int(full)))
