"""What the C++ ops check for a direct ``torch.ops.moe_kernels`` caller (csrc/cpu/common.h).

Metadata (device, dtype, rank, sizes) is checked on every call. Index values are checked by a separate pass
only in debug mode (``MOE_KERNELS_DEBUG``): moe_kernels.ops validates ids once and the plan tensors come from
``plan``. ``plan`` checks each id inside its counting pass, the one pass that reads them.
"""

from __future__ import annotations

import pytest
import torch

native = pytest.importorskip("moe_kernels.native")
if native._C is None:
    pytest.skip(f"moe_kernels._C is not built: {native._LOAD_ERROR}", allow_module_level=True)

ops = torch.ops.moe_kernels


def test_plan_rejects_out_of_range_ids():
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 4\)"):
        ops.plan(torch.tensor([[0, 4]], dtype=torch.int32), 4)


def test_index_values_are_checked_in_debug_mode(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_DEBUG", "1")
    y, weights = torch.randn(4, 3), torch.rand(2, 2)
    bad = torch.tensor([0, 1, 2, 9], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"slot_positions must lie in \[0, 4\)"):
        ops.combine(y, bad, weights)
    with pytest.raises(RuntimeError, match=r"slot_positions must lie in \[0, 4\)"):
        ops.scatter_rows_sum(y, bad, 2)
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 3\)"):
        ops.route_backward(weights, torch.randn(2, 3), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                           False, False, True, 1.0)


def test_metadata_is_checked_on_every_call(monkeypatch):
    monkeypatch.delenv("MOE_KERNELS_DEBUG", raising=False)
    y, weights, positions = torch.randn(4, 3), torch.rand(2, 2), torch.arange(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="slot_positions must be int32"):
        ops.combine(y, positions.long(), weights)
    with pytest.raises(RuntimeError, match="weights must be float32"):
        ops.combine(y, positions, weights.double())
    with pytest.raises(RuntimeError, match="T\\*k slots"):
        ops.combine(y, positions[:3], weights)
