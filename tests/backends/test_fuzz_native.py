"""The C++ entry points survive malformed input (run in a subprocess: a crash is a failure, not a hang)."""

import os
import subprocess
import sys

import pytest

import moe_kernels

pytestmark = pytest.mark.skipif("cpu" not in moe_kernels.available_backends(), reason="moe_kernels._C not built")


def test_native_ops_never_crash_on_malformed_input():
    script = os.path.join(os.path.dirname(__file__), "fuzz_native.py")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(moe_kernels.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    # -X faulthandler: a crash prints the Python stack; the script logs each call to stderr before making it
    result = subprocess.run([sys.executable, "-X", "faulthandler", script, "200"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, (f"fuzzing crashed or failed (return code {result.returncode}):\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    assert "no crash" in result.stdout
