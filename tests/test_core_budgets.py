import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vlcache.core import allocate_budgets, proportional_budgets, pyramid_budgets, total_budget, uniform_budgets

densities = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=40)
budgets = st.floats(0.001, 1.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(density=densities, budget=budgets, m=st.integers(1, 5000), min_keep=st.integers(0, 64))
def test_total_is_exact_and_bounds_hold(density, budget, m, min_keep):
    k = allocate_budgets(torch.tensor(density), budget, m, min_keep=min_keep)
    L, floor = len(density), min(min_keep, m)
    assert k.dtype == torch.long and k.shape == (L,)
    assert int(k.min()) >= floor and int(k.max()) <= m
    target = total_budget(budget, L, m)
    if target >= L * floor:
        assert int(k.sum()) == target
    else:  # infeasible: the floor wins
        assert k.tolist() == [floor] * L


@settings(max_examples=300, deadline=None)
@given(density=densities, budget=budgets, m=st.integers(1, 5000), min_keep=st.integers(0, 16))
def test_denser_layer_never_gets_fewer(density, budget, m, min_keep):
    assume(total_budget(budget, len(density), m) >= len(density) * min(min_keep, m))
    k = allocate_budgets(density, budget, m, min_keep=min_keep).tolist()
    for i in range(len(density)):
        for j in range(len(density)):
            if density[i] > density[j]:
                assert k[i] >= k[j], (density, k)


@given(density=densities, m=st.integers(1, 3000), min_keep=st.integers(0, 64))
def test_budget_one_keeps_everything(density, m, min_keep):
    assert allocate_budgets(density, 1.0, m, min_keep).tolist() == [m] * len(density)


def test_proportional_when_nothing_clips():
    k = allocate_budgets([0.2, 0.4, 0.6, 0.8], 0.25, 1000, min_keep=1)
    # total 1000, shares 0.1/0.2/0.3/0.4
    assert k.tolist() == [100, 200, 300, 400]


def test_clipped_mass_is_redistributed():
    # Layer 0 would get 0.97 * 2 * 100 * ... > m: it is clipped to m and the rest goes to layer 1.
    k = allocate_budgets([0.99, 0.01], 0.75, 100, min_keep=1)
    assert k.tolist() == [100, 50]


def test_paper_rule_would_drift_ours_does_not():
    d = torch.tensor([0.9, 0.05, 0.05])
    alpha, L, m = 0.5, 3, 200
    paper = (alpha * L * d / d.sum()).clamp(0.01, 1.0) * m  # clip only
    assert abs(float(paper.sum()) - alpha * L * m) > 10
    assert int(allocate_budgets(d, alpha, m, 2).sum()) == round(alpha * L * m)


def test_zero_density_everywhere_falls_back_to_uniform():
    assert allocate_budgets([0.0, 0.0, 0.0], 0.1, 100).tolist() == [10, 10, 10]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan")])
def test_bad_budget_raises(bad):
    with pytest.raises(ValueError, match="budget"):
        allocate_budgets([1.0], bad, 10)


def test_bad_density_raises():
    with pytest.raises(ValueError):
        allocate_budgets([1.0, -1.0], 0.5, 10)
    with pytest.raises(ValueError):
        allocate_budgets([], 0.5, 10)


def test_uniform_and_pyramid():
    u = uniform_budgets(4, 0.1, 103)
    assert int(u.sum()) == round(0.1 * 4 * 103) and int(u.max() - u.min()) <= 1
    p = pyramid_budgets(8, 0.2, 500, min_keep=1).tolist()
    assert sum(p) == round(0.2 * 8 * 500)
    assert all(a >= b for a, b in zip(p, p[1:])) and p[0] > p[-1]
    assert p[0] / p[-1] > 10  # beta = 20 makes the top layer keep far less


@given(weights=densities, budget=budgets, m=st.integers(1, 2000))
def test_proportional_budgets_exact(weights, budget, m):
    k = proportional_budgets(weights, budget, m, min_keep=1)
    target = total_budget(budget, len(weights), m)
    if target >= len(weights):
        assert int(k.sum()) == target
