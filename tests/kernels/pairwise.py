"""Pairwise parameter grids: every pair of values on every interpreted run, the full grid on a GPU.

Owns ``pairwise_params``. A kernel test over a grid of launch parameters (dtype, head
layout, block size, scenario) runs every combination on a GPU, where each case costs
milliseconds. Under the Triton interpreter each case costs about a second, so there the
cases outside a pairwise covering set (every value of any factor meets every value of
every other factor in at least one case) are marked ``slow``: ``make test`` runs the
covering set, ``make test-full`` all of them. Stateless; the set is chosen once per import
and is the same on every run.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import pytest


def covering_set(factors: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """A greedy pairwise covering set of the grid ``product(*factors)``, in grid order."""
    grid = list(itertools.product(*factors))
    missing = set().union(*(_pairs(case) for case in grid))
    chosen: list[tuple[Any, ...]] = []
    while missing:
        best = max(grid, key=lambda case: len(_pairs(case) & missing))
        chosen.append(best)
        missing -= _pairs(best)
    return sorted(chosen, key=grid.index)


def pairwise_params(factors: Sequence[Sequence[Any]], full: bool) -> list[Any]:
    """Every case of the grid as a ``pytest.param``; with ``full`` false, those outside
    ``covering_set`` are marked ``slow``."""
    keep = set(covering_set(factors))
    return [pytest.param(*case, marks=() if full or case in keep else pytest.mark.slow)
            for case in itertools.product(*factors)]


def _pairs(case: tuple[Any, ...]) -> set[tuple[int, Any, int, Any]]:
    return {(i, case[i], j, case[j]) for i, j in itertools.combinations(range(len(case)), 2)}
