"""The NetScore family: the formulas, the paper's Table V row, and refusals of bad input."""

from __future__ import annotations

import math

import pytest

import lightning_peft
from lightning_peft.metrics import netscore, ns_e, ns_m, ns_sharp

# Toktassyn & Park, Table V: ViT-S full fine-tuning on CIFAR-100
A, T, P, R = 89.7, 21.3, 144.2, 1084


def test_table_v_row():
    assert ns_e(A, T, P) == pytest.approx(69.39, abs=0.01)
    assert ns_m(A, R) == pytest.approx(70.52, abs=0.01)
    assert ns_sharp(A, R, T, P) == pytest.approx(61.81, abs=0.01)


def test_netscore_is_wongs_formula():
    a, p, m = 75.2, 3.5, 300.0  # percent, million parameters, million MACs
    expected = 20 * math.log10(a**2 / (p**0.5 * m**0.5))
    assert netscore(a, p, m) == pytest.approx(expected, rel=1e-12)
    assert netscore(a, p, m, alpha=1.0, beta=1.0, gamma=0.0) == pytest.approx(20 * math.log10(a / p), rel=1e-12)


def test_variants_follow_their_weights():
    # w = 0 removes every cost term: all three equal 20 log10(a^2)
    base = 20 * math.log10(A**2)
    assert ns_e(A, T, P, w=0) == ns_m(A, R, w=0) == pytest.approx(base)
    assert ns_sharp(A, R, T, P, w=0) == pytest.approx(base)
    # NS# = NS-E + NS-M - 20 log10(a^2): its cost terms are the two others' together
    assert ns_sharp(A, R, T, P) == pytest.approx(ns_e(A, T, P) + ns_m(A, R) - base, rel=1e-12)
    assert ns_e(A, 2 * T, P) < ns_e(A, T, P) and ns_m(A, 2 * R) < ns_m(A, R)
    assert ns_e(100, T, P) > ns_e(A, T, P)


def test_top_level_exports():
    assert lightning_peft.netscore is netscore and lightning_peft.ns_sharp is ns_sharp


@pytest.mark.parametrize("accuracy", [0, -5, 100.5, float("nan"), float("inf")])
def test_accuracy_outside_range_refused(accuracy):
    for call in (lambda: netscore(accuracy, 1, 1), lambda: ns_e(accuracy, T, P), lambda: ns_m(accuracy, R)):
        with pytest.raises(ValueError, match=r"accuracy must be .*\(0, 100\]"):
            call()


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda v: netscore(A, v, 1), "params"),
        (lambda v: netscore(A, 1, v), "macs"),
        (lambda v: ns_e(A, v, P), "seconds"),
        (lambda v: ns_e(A, T, v), "watts"),
        (lambda v: ns_m(A, v), "peak_mib"),
        (lambda v: ns_sharp(A, v, T, P), "peak_mib"),
        (lambda v: ns_sharp(A, R, v, P), "seconds"),
        (lambda v: ns_sharp(A, R, T, v), "watts"),
    ],
)
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_costs_refused(call, argument, value):
    with pytest.raises(ValueError, match=f"^{argument} must be"):
        call(value)


def test_wrong_types_and_weights_refused():
    with pytest.raises(TypeError, match="accuracy must be"):
        ns_m(True, R)
    with pytest.raises(TypeError, match="seconds must be"):
        ns_e(A, "21.3", P)
    with pytest.raises(ValueError, match="w must be"):
        ns_m(A, R, w=-0.1)
    with pytest.raises(ValueError, match="alpha must be"):
        netscore(A, 1, 1, alpha=float("nan"))
