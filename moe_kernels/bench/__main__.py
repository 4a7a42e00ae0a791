"""``python -m moe_kernels.bench``: the runner of ``moe-kernels bench`` without the CLI."""

from .cli import bench_main

raise SystemExit(bench_main())
