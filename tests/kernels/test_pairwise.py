"""The pairwise covering set that interpreted kernel grids run (tests/kernels/pairwise.py)."""
from __future__ import annotations

import itertools

from tests.kernels.pairwise import covering_set, pairwise_params


def test_the_covering_set_meets_every_pair_and_is_smaller_than_the_grid() -> None:
    factors = ([1, 3, 4], [64, 128], [16, 32], ["f32", "bf16", "f16"], ["a", "b", "c", "d"])
    chosen = covering_set(factors)
    assert len(chosen) < 20 and len(set(chosen)) == len(chosen)
    for (i, fi), (j, fj) in itertools.combinations(enumerate(factors), 2):
        for a, b in itertools.product(fi, fj):
            assert any(case[i] == a and case[j] == b for case in chosen), (i, a, j, b)
    assert covering_set(factors) == chosen  # the same cases on every run


def test_only_cases_outside_the_set_are_marked_slow() -> None:
    factors = ([1, 2, 3], ["x", "y"], [True, False])
    keep = set(covering_set(factors))
    params = pairwise_params(factors, full=False)
    assert len(params) == 12
    assert {tuple(p.values) for p in params if not p.marks} == keep
    assert all(p.marks and p.marks[0].name == "slow" for p in params if tuple(p.values) not in keep)
    assert not any(p.marks for p in pairwise_params(factors, full=True))
