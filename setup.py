"""Build moe_kernels and its native extension ``moe_kernels._C``.

The C++ CPU ops (csrc/*.cpp, csrc/common/*.cpp, csrc/cpu/*.cpp; OpenMP) are always built. The CUDA sources (csrc/cuda/*.cu)
join them when a CUDA build of torch and nvcc are present, or when MOE_KERNELS_BUILD_CUDA=1 forces it;
MOE_KERNELS_BUILD_CUDA=0 skips them. TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0".

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so the build uses the torch already
installed (build isolation would download a second, multi-GB torch). Package metadata and dependency
ranges live in pyproject.toml.
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(root):
    """A CUDA toolkit root: bin/nvcc and the headers (an `nvcc` wrapper script in /usr/local/bin would
    otherwise make /usr/local look like one, and the link then fails to find -lcudart)."""
    return bool(root) and os.path.exists(os.path.join(root, "bin", "nvcc")) and \
        os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))


def _find_cuda_home():
    """The toolkit root holding bin/nvcc (torch's own detection can pick a folder without it)."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if _is_toolkit(candidate):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(root):
            return root
    for root in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if _is_toolkit(root):
            return root
    return None


def _want_cuda(torch):
    flag = os.environ.get("MOE_KERNELS_BUILD_CUDA")
    if flag == "0":
        return False
    has_cuda_torch = torch.version.cuda is not None
    cuda_home = _find_cuda_home()
    if flag == "1":
        if not has_cuda_torch or cuda_home is None:
            sys.exit("MOE_KERNELS_BUILD_CUDA=1 but "
                     + ("torch is a CPU build" if not has_cuda_torch else "nvcc was not found (set CUDA_HOME)"))
        return True
    return has_cuda_torch and cuda_home is not None


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit("moe_kernels needs torch installed before it builds: pip install torch, then "
                 "pip install --no-build-isolation .")

    # csrc/common/*.cpp: host code shared by both devices, compiled by the C++ compiler only (never by nvcc).
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda(torch):
        return [cpp_extension.CppExtension("moe_kernels._C", cpp_sources, include_dirs=include_dirs,
                                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)], \
            cpp_extension

    cuda_home = _find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # The toolkit's own headers first: nvcc refuses runtime headers of another CUDA minor version ("CUDA compiler
    # and CUDA toolkit headers are incompatible"), and torch 2.15's wheel brings CUDA 13.2 headers, which a 13.0
    # nvcc would otherwise find first. pip's CUDA wheels then supply what a minimal toolkit lacks (cusparse.h, ...)
    # under site-packages/nvidia/cu13/include.
    include_dirs.append(os.path.join(cuda_home, "include"))
    site = sysconfig.get_paths()["purelib"]
    include_dirs += [d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d)]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    # No -std flag: torch's BuildExtension passes the standard its headers need (C++20 for torch >= 2.14).
    # No --use_fast_math: the routing kernels' expf/division must round like the CPU's and torch's.
    nvcc_flags = ["-O3", "-DNDEBUG", "-lineinfo"]
    return [cpp_extension.CUDAExtension("moe_kernels._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
                                        define_macros=[("MOE_KERNELS_WITH_CUDA", "1")],
                                        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                                        extra_link_args=link_flags)], cpp_extension


ext_modules, cpp_extension = _extensions()

# Metadata, dependencies and the entry point are in pyproject.toml (PEP 621); this adds the extension.
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
