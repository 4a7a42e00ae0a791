"""``python -m moe_kernels.bench``: the runner of ``moe-kernels bench`` without the CLI."""

from .cli import bench_main

if __name__ == "__main__":  # importing the module (e.g. walking the package) runs nothing
    raise SystemExit(bench_main())
