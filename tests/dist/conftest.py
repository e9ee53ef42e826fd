import os

import pytest

import dist_checks
from catkit.dist import run_local


@pytest.fixture(scope="session")
def dist_report():
    """``dist_report(world)``: every check of dist_checks run once on ``world`` gloo ranks (cached)."""
    cache = {}
    seed = int.from_bytes(os.urandom(4), "little")

    def get(world):
        if world not in cache:
            names = dist_checks.WORLD8_CHECKS if world == 8 else list(dist_checks.CHECKS)
            print(f"seed={seed} world={world}")
            cache[world] = run_local(dist_checks.job, world, seed, names, timeout_s=150)
        return cache[world]

    return get
