"""moe_kernels.triton.common.launcher, the backend's one way to launch a Triton kernel, and its opt-in direct path
(MOE_KERNELS_DIRECT_LAUNCH=1, common.DIRECT_LAUNCH: a specialization launched before skips JITFunction.run's
per-call Python).

Without a GPU the launch cannot run for real: a child process (no interpreter, so the kernels are JITFunctions)
mocks Triton's driver (device 0, stream 0, an sm_90 target), replaces compilation by a stand-in kernel whose launcher
records what it is given, and makes CPU tensors answer as CUDA tensors of device 0. Triton's own binder and
JITFunction.run run unchanged, so the test checks the direct path against them: same arguments, same grid, a new
specialization (an odd size, an unaligned view) going through Triton's path first, and a launch hook turning the
direct path off. On a GPU, tests/test_gpu_no_sync.py checks that direct launches give the results of Triton's own,
bit for bit, without a sync.
"""

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

_CHILD = textwrap.dedent('''
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class FakeDriver:
        def get_current_device(self): return 0
        def get_current_stream(self, device): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_device_interface(self): return torch.cuda
        def get_active_torch_device(self): return torch.device("cpu")

    driver.set_active(FakeDriver())
    launches = []  # (path, grid, args) per launch; path "triton" when Triton's run passed its hook chains

    class StandIn:  # a compiled kernel whose C launcher records its call
        function = 0
        packed_metadata = ()
        name = "stand_in"
        src = None
        def _init_handles(self): pass
        def launch_metadata(self, grid, stream, *args): return None
        def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit_, *args):
            launches.append(("triton" if enter is not None else "direct", (g0, g1, g2), args))

    compiles = []
    def compile_stand_in(self, key, signature, device, constexprs, options, attrs, warmup):
        compiles.append(key)
        kernel = StandIn()
        self.device_caches[device][0][key] = kernel
        return kernel

    jit.JITFunction._do_compile = compile_stand_in
    torch.Tensor.is_cuda = property(lambda self: True)
    class Device0:
        index = 0
    torch.Tensor.device = property(lambda self: Device0)
    torch.Tensor.get_device = lambda self: 0
    torch._C._cuda_getCurrentRawStream = lambda device: 0

    from moe_kernels.triton import common
    from moe_kernels.triton.experts import ACTIVATION_CODES, _caps, _one_token_gate_up_kernel, _weight_strides

    H, I, E, k = 256, 64, 8, 2
    x = torch.randn(1, H, dtype=torch.bfloat16)
    gate_up = torch.randn(E, 2 * I, H, dtype=torch.bfloat16)
    ids = torch.zeros(k, dtype=torch.int32)
    act = torch.empty(k, I, dtype=torch.bfloat16)

    def call(x=x, hidden=H):
        bias, stride_be, stride_bn = _weight_strides(None, x)
        common.launcher(_one_token_gate_up_kernel, (k, I // 16))(
            x, x.stride(1), gate_up, *gate_up.stride(), bias, stride_be, stride_bn, ids, act, hidden, I, 0.0,
            *_caps(None), ACTIVATION=ACTIVATION_CODES["silu"], INTERLEAVED=False, GATED=True, HAS_BIAS=False,
            HAS_LIMIT=False, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2)

    def paths():
        return [path for path, _, _ in launches]

    # off (the default): always Triton's path
    call(); call()
    assert paths() == ["triton", "triton"], paths()
    assert not common.DIRECT_LAUNCH  # the variable is unset in this process
    common.DIRECT_LAUNCH = True
    launches.clear()
    call(); call(); call()
    assert paths() == ["triton", "direct", "direct"], paths()
    (_, grid_t, args_t), (_, grid_d, args_d) = launches[0], launches[1]
    assert grid_d == grid_t == (k, I // 16, 1), (grid_t, grid_d)
    assert len(args_d) == len(args_t) == len(_one_token_gate_up_kernel.arg_names)
    assert all(a is b or a == b for a, b in zip(args_d, args_t)), (args_t, args_d)
    # a new specialization goes through Triton's path once: an odd size, a view that is not 16-byte aligned
    launches.clear()
    call(hidden=H - 1); call(hidden=H - 1)
    unaligned = torch.randn(1, H + 1, dtype=torch.bfloat16)[:, 1:]
    call(x=unaligned); call(x=unaligned)
    assert paths() == ["triton", "direct", "triton", "direct"], paths()
    assert launches[3][2][0] is unaligned
    # a launch hook set (a profiler): Triton's path, which calls it
    seen = []
    hook = lambda metadata: seen.append(metadata)
    triton.knobs.runtime.launch_enter_hook.add(hook)
    launches.clear()
    call()
    triton.knobs.runtime.launch_enter_hook.remove(hook)
    call()
    assert paths() == ["triton", "direct"], paths()
    print("compiles", len(compiles))
    print("OK")
''')


def test_direct_launch_matches_tritons_own_path():
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRITON_INTERPRET", "MOE_KERNELS_DIRECT_LAUNCH")}
    result = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
    # Triton compiled once per specialization: the first launch, the odd size, the unaligned view
    assert "compiles 3" in result.stdout, result.stdout


def test_launcher_without_direct_path_is_the_plain_launch(monkeypatch):
    """With the switch off, launcher(kernel, grid) is kernel[grid] itself; with it on, CPU tensors (the
    interpreter) still take kernel[grid]."""
    import torch

    from moe_kernels.triton import common

    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    kernel, x = Kernel(), torch.zeros(2)
    monkeypatch.setattr(common, "DIRECT_LAUNCH", False)
    common.launcher(kernel, (3,))(x, 5, BLOCK=16)
    monkeypatch.setattr(common, "DIRECT_LAUNCH", True)
    common.launcher(kernel, (3,))(x, 5, BLOCK=16)
    # a CUDA tensor and a kernel without Triton's device caches (the interpreter's): still kernel[grid]
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    common.launcher(kernel, (3,))(x, 5, BLOCK=16)
    assert calls == [((3,), (x, 5), {"BLOCK": 16})] * 3


def test_direct_launch_switch_is_read_at_import():
    env = {**os.environ, "MOE_KERNELS_DIRECT_LAUNCH": "1"}
    code = "from moe_kernels.triton import common; print(common.DIRECT_LAUNCH)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "True", result.stdout + result.stderr
