"""jaxdp.dpsgd_learning_rate: the reconstructed Corollary 1 rule, its special cases and validation."""

import math

import pytest

import jaxdp


def test_formula_value():
    # sqrt(gap / (L σ² K M B P)) = sqrt(2 / (0.5 · 4 · 1000 · 8 · 5 · 2)) = sqrt(1 / 80000)
    rate = jaxdp.dpsgd_learning_rate(
        1000, num_workers=8, num_threads=2, local_steps=5, smoothness=0.5, gradient_variance=4.0, initial_gap=2.0
    )
    assert rate == pytest.approx(1.0 / math.sqrt(80_000), rel=1e-12)
    assert jaxdp.dpsgd_learning_rate(100, num_workers=4, local_steps=25) == pytest.approx(0.01, rel=1e-12)
    assert jaxdp.dpsgd_learning_rate(1) == 1.0
    assert isinstance(jaxdp.dpsgd_learning_rate(10), float)


def test_master_batch_defaults_to_num_workers_and_overrides_it():
    assert jaxdp.dpsgd_learning_rate(50, num_workers=6) == jaxdp.dpsgd_learning_rate(50, master_batch=6)
    # the rule depends on the workers only through M
    assert jaxdp.dpsgd_learning_rate(50, num_workers=6, master_batch=2) == jaxdp.dpsgd_learning_rate(
        50, num_workers=1, master_batch=2
    )


def test_special_cases_of_lian_and_zhao():
    gap, smooth, variance = 3.0, 2.0, 0.25
    common = dict(smoothness=smooth, gradient_variance=variance, initial_gap=gap)
    # P = B = 1: asynchronous distributed SGD (Lian et al. 2015, Cor. 2), γ = sqrt(gap / (L σ² K M))
    assert jaxdp.dpsgd_learning_rate(400, num_workers=5, **common) == pytest.approx(
        math.sqrt(gap / (smooth * variance * 400 * 5))
    )
    # M = 1, B = 1: lock-free parallel SGD with P threads (Zhao et al. 2017), sqrt(gap / (L σ² K P))
    assert jaxdp.dpsgd_learning_rate(400, num_threads=7, **common) == pytest.approx(
        math.sqrt(gap / (smooth * variance * 400 * 7))
    )


@pytest.mark.parametrize("argument", ["num_iterations", "master_batch", "local_steps", "num_threads"])
def test_strictly_decreasing_in_iterations_master_batch_local_steps_threads(argument):
    base = dict(num_iterations=100, master_batch=2, local_steps=3, num_threads=2)
    rates = []
    for value in (1, 2, 5, 40):
        kwargs = {**base, argument: value}
        rates.append(jaxdp.dpsgd_learning_rate(kwargs.pop("num_iterations"), **kwargs))
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # square-root law: 4× more of anything halves the rate
    kwargs = {**base, argument: 4 * base[argument]}
    quadrupled = jaxdp.dpsgd_learning_rate(kwargs.pop("num_iterations"), **kwargs)
    plain = dict(base)
    assert quadrupled == pytest.approx(jaxdp.dpsgd_learning_rate(plain.pop("num_iterations"), **plain) / 2)


def test_decreasing_in_workers_when_master_batch_follows_them():
    rates = [jaxdp.dpsgd_learning_rate(100, num_workers=n) for n in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_direction_in_problem_constants():
    assert jaxdp.dpsgd_learning_rate(10, initial_gap=4.0) == pytest.approx(2 * jaxdp.dpsgd_learning_rate(10))
    assert jaxdp.dpsgd_learning_rate(10, smoothness=4.0) == pytest.approx(jaxdp.dpsgd_learning_rate(10) / 2)
    assert jaxdp.dpsgd_learning_rate(10, gradient_variance=4.0) == pytest.approx(jaxdp.dpsgd_learning_rate(10) / 2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_iterations=0), "num_iterations"),
        (dict(num_iterations=10, num_workers=0), "num_workers"),
        (dict(num_iterations=10, num_threads=-1), "num_threads"),
        (dict(num_iterations=10, local_steps=0), "local_steps"),
        (dict(num_iterations=10, master_batch=0), "master_batch"),
        (dict(num_iterations=10, smoothness=0.0), "smoothness"),
        (dict(num_iterations=10, gradient_variance=-1.0), "gradient_variance"),
        (dict(num_iterations=10, initial_gap=float("nan")), "initial_gap"),
        (dict(num_iterations=10, initial_gap=float("inf")), "initial_gap"),
    ],
)
def test_non_positive_inputs_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"dpsgd_learning_rate: {name}"):
        jaxdp.dpsgd_learning_rate(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_iterations=2.5), "num_iterations"),
        (dict(num_iterations=True), "num_iterations"),
        (dict(num_iterations=10, local_steps="3"), "local_steps"),
        (dict(num_iterations=10, smoothness="1"), "smoothness"),
    ],
)
def test_wrong_types_raise_naming_them(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=f"dpsgd_learning_rate: {name}"):
        jaxdp.dpsgd_learning_rate(**kwargs)


def test_accepts_integral_floats_for_counts():
    assert jaxdp.dpsgd_learning_rate(1e4) == jaxdp.dpsgd_learning_rate(10_000)
