"""Column/row-parallel linears and the TP CatModel at TP = 2, 4 (8: linears) on gloo vs the unsharded
modules (checks in dist_checks.py)."""

import pytest
import torch

from dist_checks import assert_check

from catkit.dist import ColumnParallelLinear, RowParallelLinear


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("check", ["tp_exact", "tp_flash", "tp_bad", "tp_model", "tp_model_bad"])
def test_tensor_parallel(dist_report, world, check):
    assert_check(dist_report(world), check)


def test_tensor_parallel_world8(dist_report):
    assert_check(dist_report(8), "tp_exact")


def test_single_process_layers_equal_linear():
    # without a process group the layers are the whole layer (TP = 1)
    lin = torch.nn.Linear(16, 12)
    x = torch.randn(3, 16)
    torch.testing.assert_close(ColumnParallelLinear.from_linear(lin)(x), lin(x))
    torch.testing.assert_close(RowParallelLinear.from_linear(lin)(x), lin(x))
