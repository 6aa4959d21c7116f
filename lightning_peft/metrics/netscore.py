"""The NetScore family: one number for accuracy against cost (higher is better).

All four are decibel-style scores ``20 * log10(accuracy_term / cost_term)``:

* ``netscore`` (Wong 2018): ``20 * log10(a**alpha / (p**beta * m**gamma))`` with ``a`` top-1
  accuracy in percent, ``p`` parameters in millions, ``m`` multiply-accumulates (per sample,
  one forward) in millions; ``alpha = 2``, ``beta = gamma = 0.5``.
* the deployment-aware variants of Toktassyn & Park (arXiv 2607.02158), weight ``w = 1/8``:
  ``ns_e = 20 * log10(a**2 / (t**w * P**w))`` (``t`` total inference time in seconds over the
  timed set, ``P`` average power in watts), ``ns_m = 20 * log10(a**2 / r**w)`` (``r`` peak
  inference memory in MiB) and ``ns_sharp = 20 * log10(a**2 / (r**w * t**w * P**w))``.

The paper's Table V row (ViT-S full fine-tuning on CIFAR-100: a = 89.7, t = 21.3 s,
P = 144.2 W, r = 1084 MiB) gives NS-E 69.39, NS-M 70.52, NS# 61.81; ``tests/metrics`` checks it.

Bad input (accuracy outside (0, 100], a non-positive or non-finite size, time or power, NaN)
raises ``ValueError``/``TypeError`` naming the argument: a logarithm of a bad value would be a
silent ``nan`` or ``inf`` score. Pure Python (no torch, no Lightning).
"""

from __future__ import annotations

import math

from lightning_peft.validation import check_float

__all__ = ["netscore", "ns_e", "ns_m", "ns_sharp"]


def _accuracy(accuracy: float) -> float:
    """Top-1 accuracy in percent, in (0, 100] (a fraction such as 0.9 passes the range: the
    callers convert, see ``EfficiencyCallback``)."""
    return check_float("accuracy", accuracy, low=0.0, high=100.0, low_open=True)


def _positive(name: str, value: float) -> float:
    return check_float(name, value, low=0.0, low_open=True)


def _exponent(name: str, value: float) -> float:
    return check_float(name, value, low=0.0)


def netscore(accuracy: float, params: float, macs: float, alpha: float = 2.0, beta: float = 0.5, gamma: float = 0.5) -> float:
    """Wong's NetScore ``20 * log10(a**alpha / (p**beta * m**gamma))``.

    ``accuracy``: top-1 in percent, (0, 100]; ``params``: parameter count in millions (> 0);
    ``macs``: multiply-accumulates per sample in millions (> 0); exponents finite and >= 0.
    """
    a = _accuracy(accuracy)
    p, m = _positive("params", params), _positive("macs", macs)
    alpha, beta, gamma = _exponent("alpha", alpha), _exponent("beta", beta), _exponent("gamma", gamma)
    return 20.0 * (alpha * math.log10(a) - beta * math.log10(p) - gamma * math.log10(m))


def ns_e(accuracy: float, seconds: float, watts: float, w: float = 1 / 8) -> float:
    """NS-E ``20 * log10(a**2 / (t**w * P**w))``: ``seconds`` total inference time over the
    timed set (> 0), ``watts`` average power over it (> 0)."""
    a = _accuracy(accuracy)
    t, p, w = _positive("seconds", seconds), _positive("watts", watts), _exponent("w", w)
    return 20.0 * (2.0 * math.log10(a) - w * math.log10(t) - w * math.log10(p))


def ns_m(accuracy: float, peak_mib: float, w: float = 1 / 8) -> float:
    """NS-M ``20 * log10(a**2 / r**w)``: ``peak_mib`` peak inference memory in MiB (> 0)."""
    a = _accuracy(accuracy)
    r, w = _positive("peak_mib", peak_mib), _exponent("w", w)
    return 20.0 * (2.0 * math.log10(a) - w * math.log10(r))


def ns_sharp(accuracy: float, peak_mib: float, seconds: float, watts: float, w: float = 1 / 8) -> float:
    """NS# ``20 * log10(a**2 / (r**w * t**w * P**w))``: memory, time and power together."""
    a = _accuracy(accuracy)
    r, t, p = _positive("peak_mib", peak_mib), _positive("seconds", seconds), _positive("watts", watts)
    w = _exponent("w", w)
    return 20.0 * (2.0 * math.log10(a) - w * (math.log10(r) + math.log10(t) + math.log10(p)))
