import pytest


@pytest.fixture(autouse=True)
def _poison_outputs(poison_empty):
    """Every op test runs with NaN-poisoned ``torch.empty`` (see tests/conftest.py)."""
    yield
