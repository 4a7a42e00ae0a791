"""Expert parallelism on gloo: the check script (outputs and gradients vs one process) must pass."""

import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def test_expert_parallel_check_world_size_2():
    # The check spawns its own gloo ranks; world size 4 runs in .ci/run.
    result = subprocess.run([sys.executable, "-m", "moe_kernels.distributed.check", "--world-size", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "check passed" in result.stdout


def test_expert_parallel_needs_an_initialised_group():
    from moe_kernels.distributed import expert_parallel_moe_mlp
    import torch
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        expert_parallel_moe_mlp(torch.randn(2, 4), torch.randn(2, 6, 4), torch.randn(2, 4, 3), torch.rand(2, 1),
                                torch.zeros(2, 1, dtype=torch.int32), 2)
