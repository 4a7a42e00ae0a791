"""Running cases: every provider of a case on every pass (:func:`run_case`), and every case a run asks for
(:func:`run_benchmarks`), rows flushed to ``bench.csv`` as they come."""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch

from .cases import build_adapter_case, build_lora_case, build_moe_case, build_plan_case, build_route_case
from .providers import Case
from .report import write_csv
from .shapes import (ADAPTER_SHAPES, CSV_COLUMNS, DECODE_TOKENS, LORA_SHAPES, MOE_SHAPES, PASSES, QUICK, SUITES,
                     TRAIN_TOKENS, cpu_tokens)
from .timing import machine_info, measure_copy_bandwidth, measure_interleaved, peak_memory_bytes, saved_activation_bytes


def _clear_grads(params):
    for p in params:
        p.grad = None


def run_case(case: Case, passes, timing_kwargs: dict, device: torch.device, memory: bool,
             fwd_only: tuple = ()) -> list[dict]:
    """Time every provider of ``case`` on every pass (``fwd_only`` providers: forward only); rows without
    machine columns."""
    rows = []
    leaves = [p for p in case.params if p.is_floating_point()]
    outputs, failed = {}, {}
    with torch.no_grad():
        for name, fn in list(case.providers.items()):
            try:
                out = fn()
            except Exception as exc:  # noqa: BLE001 - one failing provider must not sink the run
                failed[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                continue
            outputs[name] = (case.canonical(out) if case.canonical else out).float()
    providers = {name: fn for name, fn in case.providers.items() if name not in failed}
    ref_out = outputs.get(case.reference) if case.reference else None
    grad_out = torch.randn_like(next(iter(outputs.values()))).to(leaves[0].dtype) if leaves else None
    for pass_name in passes if case.differentiable else ("fwd",):
        for name, note in failed.items():
            rows.append({"pass": pass_name, "provider": name, "note": note})
        active = {name: fn for name, fn in providers.items() if pass_name == "fwd" or name not in fwd_only}
        runs = {}
        for name, fn in active.items():
            if pass_name == "fwd":
                def forward(_, fn=fn):
                    with torch.no_grad():
                        fn()
                runs[name] = (forward, None)
            elif pass_name == "fwdbwd":
                runs[name] = (lambda _, fn=fn: fn().backward(grad_out), lambda: _clear_grads(leaves))
            else:
                def setup(fn=fn):
                    _clear_grads(leaves)
                    return fn()
                runs[name] = (lambda out: out.backward(grad_out), setup)
        ideal = case.ideal
        if ideal is not None:  # the ideal's dense chain joins the rounds, so it shares the providers' load
            chain, ideal_leaves, ideal_grads = ideal.dense_chain, ideal.leaves, ideal.grads

            def clear_ideal():
                for leaf in ideal_leaves:
                    leaf.grad = None
                return None

            if pass_name == "fwd":
                def ideal_forward(_):
                    with torch.no_grad():
                        chain()
                runs["cpu_ideal"] = (ideal_forward, None)
            elif pass_name == "fwdbwd":
                runs["cpu_ideal"] = (lambda _: torch.autograd.backward(chain(), ideal_grads), clear_ideal)
            else:
                runs["cpu_ideal"] = (lambda outs: torch.autograd.backward(outs, ideal_grads),
                                     lambda: clear_ideal() or chain())
        for p in leaves:
            p.requires_grad_(pass_name != "fwd")
        try:
            timings, errors = measure_interleaved(runs, device=device, **timing_kwargs)
            ideal_row = None
            if ideal is not None and "cpu_ideal" in timings:
                ms, note = ideal.from_dense_ms(pass_name, timings.pop("cpu_ideal").median_ms)
                ideal_row = {"pass": pass_name, "provider": "cpu_ideal", "median_ms": ms, "q1_ms": ms, "q3_ms": ms,
                             "repeats": 0, "note": note}
            for name, fn in active.items():
                row = {"pass": pass_name, "provider": name, "note": case.notes.get(name, "")}
                rows.append(row)
                if name in errors:
                    exc = errors[name]
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    continue
                timing = timings[name]
                row.update(median_ms=timing.median_ms, q1_ms=timing.q1_ms, q3_ms=timing.q3_ms,
                           repeats=timing.repeats)
                if timing.repeats == 1 < timing_kwargs.get("min_repeats", 1):
                    row["note"] = "; ".join(filter(None, (row["note"], "slow: timed once")))
                if ref_out is not None and name in outputs and name not in case.not_comparable:
                    row["max_abs_err"] = float((outputs[name] - ref_out).abs().max())
                if memory and pass_name == "fwdbwd":
                    try:
                        _clear_grads(leaves)
                        row["peak_mb"] = peak_memory_bytes(lambda fn=fn: fn().backward(grad_out), device) / 2**20
                        row["saved_mb"] = saved_activation_bytes(fn, case.params) / 2**20
                    except Exception as exc:  # noqa: BLE001
                        row["note"] = "; ".join(filter(None, (row["note"], f"memory failed: {type(exc).__name__}")))
            if ideal_row:
                rows.append(ideal_row)
        finally:
            for p in leaves:
                p.requires_grad_(False)
            _clear_grads(leaves)
    for name, note in case.notes.items():
        if name not in case.providers:
            for pass_name in passes if case.differentiable else ("fwd",):
                rows.append({"pass": pass_name, "provider": name, "note": note})
    # ratios against the headline provider, per pass
    baseline = {r["pass"]: r.get("median_ms") for r in rows if r["provider"] == case.baseline}
    for r in rows:
        base = baseline.get(r["pass"])
        if base and r.get("median_ms"):
            r["ratio_vs_mk"] = r["median_ms"] / base
    s = case.shape.scaled(case.scale) if case.scale > 1 else case.shape
    common = {"suite": case.suite, "shape": case.shape.name, "scale": case.scale, "hidden": s.hidden,
              "intermediate": getattr(s, "intermediate", ""), "experts": s.num_experts, "top_k": s.top_k,
              "rank": getattr(s, "rank", ""), "tokens": case.tokens, "dtype": case.dtype}
    return [{**common, **r} for r in rows]


def run_benchmarks(args) -> tuple[list[dict], dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    info = machine_info(device)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    suites = args.suite or list(SUITES)
    dtypes = args.dtype or list(QUICK["dtypes"])
    passes = args.passes or list(QUICK["passes"] if args.quick else PASSES)
    min_repeats, max_repeats, budget = (3, 40, 0.25) if args.quick else (5, 50, 1.0)
    if args.repeats is not None:
        min_repeats = args.repeats
    timing_kwargs = {"min_repeats": min_repeats, "max_repeats": max(min_repeats, max_repeats),
                     "budget_s": budget if args.budget is None else args.budget,
                     "slow_s": 2.0 if args.quick else 30.0}
    on_cpu = device.type == "cpu"
    bandwidth = measure_copy_bandwidth(args.bandwidth_mb * 2**20) if on_cpu else None
    info["bandwidth_gbs"] = bandwidth / 1e9 if bandwidth else None

    def scale_of(shape):
        return (args.scale or shape.cpu_scale) if on_cpu else 1

    def pick(shapes, quick_names=None):
        names = args.shape or (quick_names if args.quick and quick_names else list(shapes))
        return [shapes[n] for n in names if n in shapes]

    def tokens_for(scale, quick_tokens, full_tokens):
        base = args.tokens or (quick_tokens if args.quick else full_tokens)
        return sorted({cpu_tokens(t, scale) if on_cpu else t for t in base})

    csv_path = os.path.join(args.out, "bench.csv")

    class _Rows(list):
        """Rows, stamped with the run's machine columns and flushed to bench.csv after every case, so an
        interrupted run still leaves its measurements."""

        def __iadd__(self, new_rows):
            for r in new_rows:
                r.update(run_id=run_id, **{k: v for k, v in info.items() if k in CSV_COLUMNS})
            self.extend(new_rows)
            write_csv(self, csv_path)
            return self

    rows = _Rows()
    fwd_only = QUICK["fwd_only_providers"] if args.quick else ()

    def progress(msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if "moe" in suites:
        moe_points = [(shape, tokens, passes) for shape in pick(MOE_SHAPES, QUICK["moe_shapes"])
                      for tokens in tokens_for(scale_of(shape), QUICK["moe_tokens"], DECODE_TOKENS + TRAIN_TOKENS)]
        if args.quick and not args.shape and not args.tokens:
            moe_points += [(MOE_SHAPES[name], 1, ("fwd",)) for name in QUICK["decode_shapes"]]
        for shape, tokens, point_passes in moe_points:
            scale = scale_of(shape)
            for dtype in dtypes:
                progress(f"moe {shape.name} /{scale} T={tokens} {dtype}")
                case = build_moe_case(shape, scale, tokens, dtype, device, bandwidth, timing_kwargs)
                rows += run_case(case, point_passes, timing_kwargs, device, memory=not args.no_memory, fwd_only=fwd_only)
                del case
    adapter_suites = (("adapter", ADAPTER_SHAPES, build_adapter_case), ("lora", LORA_SHAPES, build_lora_case))
    for suite, shapes, build in adapter_suites:
        if suite not in suites:
            continue
        for shape in pick(shapes):
            scale = scale_of(shape)
            for tokens in tokens_for(scale, QUICK[f"{suite}_tokens"], (64,) + TRAIN_TOKENS):
                for dtype in dtypes:
                    progress(f"{suite} {shape.name} /{scale} T={tokens} {dtype}")
                    case = build(shape, scale, tokens, dtype, device)
                    rows += run_case(case, passes, timing_kwargs, device, memory=not args.no_memory, fwd_only=fwd_only)
    if "route" in suites or "plan" in suites:
        for shape in pick(MOE_SHAPES, ("olmoe_1b_7b", "deepseek_v3_like", "gpt_oss_20b")):
            for tokens in (args.tokens or (QUICK["route_tokens"] if args.quick else (64,) + TRAIN_TOKENS)):
                if "route" in suites:
                    progress(f"route {shape.name} T={tokens}")
                    rows += run_case(build_route_case(shape, tokens, device), ("fwd",), timing_kwargs, device, False)
                if "plan" in suites:
                    progress(f"plan {shape.name} T={tokens}")
                    rows += run_case(build_plan_case(shape, tokens, device), ("fwd",), timing_kwargs, device, False)
    return list(rows), info
