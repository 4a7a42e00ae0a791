"""Reports of a run: the roofline of the full-size shapes, the side-by-side Markdown tables, the goals, the
memory and notes sections, one plot per suite, and ``bench.csv``."""

from __future__ import annotations

import csv

from .shapes import CSV_COLUMNS, H100_BF16_FLOPS, H100_HBM_BYTES_PER_S, MOE_SHAPES, SUITES, expected_touched_experts


def roofline_rows(tokens_list=(1, 64, 4096, 16384), bytes_per_elem: int = 2) -> list[dict]:
    """Minimum FLOPs and bytes of each full-size MoE layer (forward), and the H100 time they imply.

    FLOPs = 2 * T * k * 3 * H * I (gate, up, down). Bytes = every expected-touched expert's weights read
    once (uniform routing) + x read + y written, in bf16. Time = max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s).
    """
    rows = []
    for shape in MOE_SHAPES.values():
        for tokens in tokens_list:
            flops = 2 * tokens * shape.top_k * 3 * shape.hidden * shape.intermediate
            touched = expected_touched_experts(shape.num_experts, shape.top_k, tokens)
            num_bytes = (touched * 3 * shape.hidden * shape.intermediate + 2 * tokens * shape.hidden) * bytes_per_elem
            t_flops, t_bytes = flops / H100_BF16_FLOPS, num_bytes / H100_HBM_BYTES_PER_S
            rows.append({"shape": shape.name, "tokens": tokens, "gflops": flops / 1e9, "mbytes": num_bytes / 1e6,
                         "touched_experts": round(touched, 1), "h100_us": max(t_flops, t_bytes) * 1e6,
                         "bound": "compute" if t_flops > t_bytes else "memory",
                         "intensity_flop_per_byte": flops / num_bytes})
    return rows


def format_roofline(rows: list[dict], measured: list[dict] = ()) -> str:
    """The roofline table; with GPU measurements (full-size bf16 forward rows), each provider's time beside it."""
    gpu_rows = [r for r in measured if r["suite"] == "moe" and r["scale"] == 1 and r["dtype"] == "bf16"
                and r["pass"] == "fwd" and r.get("median_ms") and str(r.get("device", "")).startswith("cuda")]
    providers = sorted({r["provider"] for r in gpu_rows})
    lines = [f"Roofline (forward, full-size shapes, bf16; H100 peaks assumed: {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s "
             f"dense bf16, {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s HBM3)", "",
             "| shape | T | GFLOP | MB moved | experts touched | FLOP/byte | H100 min time (us) | bound |"
             + "".join(f" {p} us (x roofline) |" for p in providers),
             "|---|---:|---:|---:|---:|---:|---:|---|" + "---:|" * len(providers)]
    for r in rows:
        cells = []
        for p in providers:
            m = next((g for g in gpu_rows if (g["shape"], g["tokens"], g["provider"]) == (r["shape"], r["tokens"], p)),
                     None)
            cells.append(f"{m['median_ms'] * 1e3:.1f} ({m['median_ms'] * 1e3 / r['h100_us']:.2f}x)" if m else "-")
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['gflops']:.2f} | {r['mbytes']:.1f} | {r['touched_experts']} "
                     f"| {r['intensity_flop_per_byte']:.1f} | {r['h100_us']:.1f} | {r['bound']} |"
                     + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- reporting


def format_table(rows: list[dict], suite: str) -> str:
    """Side-by-side table of one suite: the headline provider's time, then every provider's ratio to it."""
    rows = [r for r in rows if r["suite"] == suite]
    if not rows:
        return ""
    providers = []
    for r in rows:
        if r["provider"] not in providers and r.get("median_ms") is not None:
            providers.append(r["provider"])
    headline = next((p for p in providers if p.startswith("mk:") and p != "mk:reference"), providers[0])
    others = [p for p in providers if p != headline]
    keys = []
    for r in rows:
        key = (r["shape"], r["tokens"], r["dtype"], r["pass"])
        if key not in keys:
            keys.append(key)
    head = ["shape (scale)", "T", "dtype", "pass", f"{headline} ms"] + [f"{p} / mk" for p in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (1 + len(others))]
    by_key = {}
    for r in rows:
        by_key[(r["shape"], r["tokens"], r["dtype"], r["pass"], r["provider"])] = r
    for key in keys:
        first = next(r for r in rows if (r["shape"], r["tokens"], r["dtype"], r["pass"]) == key)
        base = by_key.get(key + (headline,), {})
        cells = [f"{key[0]} (/{first['scale']})" if first["scale"] > 1 else key[0], str(key[1]), key[2], key[3],
                 f"{base['median_ms']:.3f}" if base.get("median_ms") else "-"]
        for p in others:
            r = by_key.get(key + (p,), {})
            cells.append(f"{r['ratio_vs_mk']:.2f}x" if r.get("ratio_vs_mk") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


GOAL_GROUPED_MM_FWD = 1.5  # moe_kernels at least this much faster than transformers' grouped_mm, forward
GOAL_GROUPED_MM_FWDBWD = 2.0  # ... and forward+backward (OLMoE and Qwen3 shapes)
GOAL_IDEAL_FWD = 1.15  # moe_kernels forward within this factor of the CPU ideal, every shape
GOAL_ADAPTER_OVER_DENSE = 1.15  # PESC adapter-MoE layer / dense FFN alone


def format_goals(rows: list[dict]) -> str:
    """The issue's goals, each measured point marked met / short."""
    def median(suite, shape, tokens, dtype, pass_name, provider):
        for r in rows:
            if (r["suite"], r["shape"], r["tokens"], r["dtype"], r["pass"], r["provider"]) == \
                    (suite, shape, tokens, dtype, pass_name, provider) and r.get("median_ms"):
                return r["median_ms"]
        return None

    points = []
    for r in rows:
        key = (r["suite"], r["shape"], r["tokens"], r["dtype"])
        if key not in points:
            points.append(key)
    lines = ["| goal | shape | T | dtype | measured | target | met |", "|---|---|---:|---|---:|---:|---|"]
    for suite, shape, tokens, dtype in points:
        headline = next((r["provider"] for r in rows if r["suite"] == suite and r["provider"].startswith("mk:")), None)
        if headline is None:
            continue
        checks = []
        if suite == "moe":
            if shape in ("olmoe_1b_7b", "qwen3_30b_a3b"):
                for pass_name, target in (("fwd", GOAL_GROUPED_MM_FWD), ("fwdbwd", GOAL_GROUPED_MM_FWDBWD)):
                    mk, hf = (median(suite, shape, tokens, dtype, pass_name, p) for p in (headline, "hf:grouped_mm"))
                    if mk and hf:
                        checks.append((f"grouped_mm {pass_name} / mk (speed-up)", hf / mk, f">= {target}",
                                       hf / mk >= target))
            mk, ideal = (median(suite, shape, tokens, dtype, "fwd", p) for p in (headline, "cpu_ideal"))
            if mk and ideal:
                checks.append(("mk fwd / CPU ideal fwd", mk / ideal, f"<= {GOAL_IDEAL_FWD}", mk / ideal <= GOAL_IDEAL_FWD))
        elif suite == "adapter":
            for pass_name in ("fwd", "fwdbwd"):
                mk, dense = (median(suite, shape, tokens, dtype, pass_name, p) for p in (headline, "dense_ffn"))
                if mk and dense:
                    checks.append((f"adapter layer / dense FFN ({pass_name})", mk / dense,
                                   f"<= {GOAL_ADAPTER_OVER_DENSE}", mk / dense <= GOAL_ADAPTER_OVER_DENSE))
        for goal, value, target, met in checks:
            lines.append(f"| {goal} | {shape} | {tokens} | {dtype} | {value:.2f} | {target} | "
                         f"{'yes' if met else '**no**'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def format_memory(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("peak_mb") is not None and r["pass"] == "fwdbwd"]
    if not rows:
        return ""
    lines = ["| suite | shape | T | dtype | provider | peak fwd+bwd MiB | saved for bwd MiB |",
             "|---|---|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['shape']} | {r['tokens']} | {r['dtype']} | {r['provider']} "
                     f"| {r['peak_mb']:.1f} | {r['saved_mb']:.1f} |")
    return "\n".join(lines)


def format_notes(rows: list[dict]) -> str:
    seen = []
    for r in rows:
        if r.get("note") and r.get("median_ms") is None:
            line = f"- {r['suite']} {r['shape']} T={r['tokens']} {r['dtype']}: {r['provider']}: {r['note']}"
            if line not in seen:
                seen.append(line)
    return "\n".join(seen)


def plot_suite(rows: list[dict], suite: str, path: str) -> bool:
    """One panel per shape: each provider's time relative to moe_kernels per (T, dtype, pass), log scale.
    Returns False when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r["suite"] == suite and r.get("ratio_vs_mk")]
    if not rows:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("mk:"), p))
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    width = 0.8 / max(1, len(providers))
    most_cases = max(len({(r["tokens"], r["dtype"], r["pass"]) for r in rows if r["shape"] == sh}) for sh in shapes)
    fig, axes = plt.subplots(len(shapes), 1, squeeze=False,
                             figsize=(min(28, max(8, 0.45 * most_cases * len(providers) / 3 + 3)), 3.2 * len(shapes)))
    for ax, shape in zip(axes[:, 0], shapes):
        shape_rows = [r for r in rows if r["shape"] == shape]
        cases = list(dict.fromkeys((r["tokens"], r["dtype"], r["pass"]) for r in shape_rows))
        for i, p in enumerate(providers):
            xs, ys = [], []
            for j, case in enumerate(cases):
                r = next((r for r in shape_rows if r["provider"] == p and (r["tokens"], r["dtype"], r["pass"]) == case),
                         None)
                if r:
                    xs.append(j + i * width)
                    ys.append(r["ratio_vs_mk"])
            ax.bar(xs, ys, width, label=p, color=colors[p])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{shape} (/{shape_rows[0]['scale']})" if shape_rows[0]["scale"] > 1 else shape, fontsize=9)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"T={t} {d} {p}" for t, d, p in cases], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("time / moe_kernels", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=7)
    fig.suptitle(f"moe_kernels bench: {suite} (bars above 1: slower than moe_kernels)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: csv_value(r.get(c, "")) for c in CSV_COLUMNS})


def csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def headline_name(rows: list[dict]) -> str:
    return next((r["provider"] for r in rows if r["provider"].startswith("mk:") and r["provider"] != "mk:reference"),
                "mk:reference")


def render_summary(rows: list[dict], info: dict, suites, roofline: list[dict]) -> str:
    bw = info.get("bandwidth_gbs")
    parts = [f"Machine: {info['machine']}, {info['cpu']}; device {info['device']}; {info['threads']} threads; "
             f"torch {info['torch']}, transformers {info['transformers']}, moe_kernels {info['moe_kernels']}"
             + (f"; measured copy bandwidth {bw:.1f} GB/s" if bw else "")]
    if info.get("load") and info["load"][0] is not None:
        before, after, seconds = info["load"]
        parts.append(f"Run took {seconds:.0f} s; 1-minute load average {before:.1f} at the start, {after:.1f} at the end "
                     f"(above the thread count means other processes shared the cores: expect noisy timings).")
    titles = {"moe": "MoE block (router + routing + expert MLPs)", "adapter": "PESC adapter-MoE layer",
              "lora": "Self-MoE LoRA-MoE linear", "route": "Routing alone", "plan": "Dispatch plan alone"}
    for suite in SUITES:
        if suite == "roofline" or suite not in suites:
            continue
        table = format_table(rows, suite)
        if table:
            parts += [f"### {titles[suite]}", "Ratios are provider time / moe_kernels time (>1: moe_kernels faster).",
                      table]
    goals = format_goals(rows)
    if goals:
        parts += ["### Goals (issue 8)", f"Measured with {headline_name(rows)} as moe_kernels.", goals]
    memory = format_memory(rows)
    if memory:
        parts += ["### Memory (forward+backward)", memory]
    notes = format_notes(rows)
    if notes:
        parts += ["### Skipped / notes", notes]
    if roofline:
        parts += ["### " + format_roofline(roofline, rows)]
    return "\n\n".join(parts) + "\n"
