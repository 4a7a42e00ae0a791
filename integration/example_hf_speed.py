"""Load a local Hugging Face MoE checkpoint, patch it with moe_kernels, report tokens/s before and after.

    python integration/example_hf_speed.py [CHECKPOINT_DIR] [--tokens 128] [--batch 4] [--dtype float32] [--compile]
                                           [--size tiny|olmoe]

CHECKPOINT_DIR is any local directory saved by ``save_pretrained`` of a supported family (see
``moe-kernels info``). Without one, a random-weight Mixtral is saved to a temporary directory and used, so the
script runs as written on any machine: ``--size tiny`` (the CPU default: hidden 256, 8 experts, 2 layers) or
``--size olmoe`` (the GPU default: OLMoE's MoE layer, hidden 2048, 64 experts of width 1024, top-8, in 4 layers).
At the tiny size every op is bound by the host's time to issue it, on both sides: the H200 run 3 measured the same
eager prefill of the patched model at 152617 and 104121 tokens/s in two runs, so its ratios say little.

Measures prefill (forward over the whole batch) and greedy decoding with the KV cache (medians of --repeats runs,
wall time with the GPU synchronised), unpatched (transformers' default experts path) and patched, and compares
their greedy tokens (in fp32 they must be identical; in bf16/fp16 a divergence late in a sequence can be rounding
and is reported, not failed).

--decode-graphs (eager decoding only) also measures the patched model with ``MOE_KERNELS_DECODE_GRAPHS=1``: its
decode-size expert calls replayed from CUDA graphs (moe_kernels/decode_graphs.py), a third row.

--breakdown (eager decoding only) also profiles one decode step of each model (one new token per sequence, the
prompt in a dynamic cache): kernels launched, their summed time, the step's wall time and the share of it the GPU
ran none of them (the host's part), and the patched step's top kernels (moe_kernels.bench.timing.kernel_times).

--compile decodes as transformers' compiled generation does: a static KV cache and the forward compiled by
``generate`` (its default compile config: inductor with CUDA graphs; on a CPU ``--compile-backend`` is used and the
compile is forced, since transformers compiles on accelerators only). Both models compile; the warm-up run pays it.
"""

import argparse
import inspect
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

import moe_kernels.hf  # noqa: E402


SIZES = {  # random-weight Mixtral checkpoints by name: MixtralConfig arguments
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(vocab_size=4096, hidden_size=2048, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=8, num_local_experts=64, num_experts_per_tok=8),
}


def _random_checkpoint(path: str, size: str, device: str, dtype: torch.dtype) -> str:
    """Saves a random-weight Mixtral of ``size`` to ``path``, initialised on ``device`` in ``dtype`` (the olmoe size
    holds 1.6 G parameters: a CPU initialisation in float32 would take most of a GPU check's step)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MixtralForCausalLM(MixtralConfig(**SIZES[size], max_position_embeddings=1024))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path)
    return path


def _reset_compile() -> None:
    """A fresh torch.compile state: no cached graphs, and the counters :func:`_compile_counters` reads at zero."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def _compile_counters() -> str:
    """What torch.compile did since :func:`_reset_compile`: graphs compiled, graph breaks, and the graphs inductor
    did not run as CUDA graphs (each would pay the host's time per kernel launch, as eager does)."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    return (f"graphs {counters['stats'].get('unique_graphs', 0)}, graph breaks {breaks}, "
            f"CUDA-graph skips {counters['inductor'].get('cudagraph_skips', 0)}")


def _median_seconds(fn, repeats: int):
    """Median wall time of ``fn()`` over ``repeats`` runs, each started and ended with the GPU idle (CUDA runs
    asynchronously: without the synchronisation a forward's time would be the time to queue its kernels)."""
    times, result = [], None
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        result = fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _measure(model, input_ids, new_tokens: int, repeats: int, compile_config=None):
    """(prefill tokens/s, decode tokens/s, generated ids): medians over ``repeats`` runs after a warm-up.
    With ``compile_config``: static-cache generation, compiled by generate (the warm-up compiles)."""
    extra = {} if compile_config is None else dict(cache_implementation="static", compile_config=compile_config)

    def generate():
        return model.generate(input_ids=input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, **extra)
    with torch.inference_mode():
        model(input_ids=input_ids)
        generate()  # warm-up
        prefill_s, _ = _median_seconds(lambda: model(input_ids=input_ids), repeats)
        generate_s, out = _median_seconds(generate, repeats)
    # generate() includes one prefill: the decode rate counts only the steps after it. Where the prefill alone timed
    # slower than the whole generate (a noisy, shared machine; tiny decode work), there is no decode time to divide
    # by: NaN, which main() explains, instead of a rate of billions of tokens/s.
    decode_s = generate_s - prefill_s
    decode_rate = input_ids.shape[0] * new_tokens / decode_s if decode_s > 0 else float("nan")
    return input_ids.numel() / prefill_s, decode_rate, out


def _decode_step(model, input_ids, device: str, iters: int = 8) -> dict:
    """kernel_times of one eager decode step after the prompt (the dynamic cache grows by a token per step)."""
    from moe_kernels.bench.timing import kernel_times

    # transformers renames past_key_values to cache (5.24 accepts both and warns on the old name; 5.21 has only it)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=input_ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return kernel_times(lambda i: model(input_ids=token, use_cache=True, **{cache_name: cache}), iters,
                            torch.device(device))


def _step_line(label: str, step: dict) -> str:
    idle = "-" if step["gpu_idle"] is None else f"{100 * step['gpu_idle']:.0f}%"
    return f"{label:<26}{step['launches']:>10.0f}{step['kernel_ms']:>12.3f}{step['wall_ms']:>10.3f}{idle:>10}"


def _compile_config(device: str, backend: str):
    """transformers' default compile config of generate on an accelerator; on a CPU the given backend, forced."""
    from transformers import CompileConfig

    if device == "cuda":
        return CompileConfig()
    config = CompileConfig(backend=backend, mode="reduce-overhead" if backend == "inductor" else None)
    config._compile_all_devices = True
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="local checkpoint directory")
    parser.add_argument("--tokens", type=int, default=128, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default=None, help="moe_kernels backend (default: chosen by device)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--compile", action="store_true",
                        help="decode with a static cache, the forward compiled by generate (as transformers does)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="the random-weight model without CHECKPOINT_DIR (default: olmoe on a GPU, tiny on a CPU)")
    parser.add_argument("--decode-graphs", action="store_true",
                        help="also time the patched model with MOE_KERNELS_DECODE_GRAPHS=1 (eager decoding)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile one eager decode step of each model: kernels, their time, GPU idle share")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for --compile on a CPU (CUDA uses transformers' default)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        size = args.size or ("olmoe" if device == "cuda" else "tiny")
        path = args.checkpoint or _random_checkpoint(tmp, size, device, dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        if model.config.model_type not in moe_kernels.hf.supported_model_types():
            print(f"{model.config.model_type} is not supported; supported: {moe_kernels.hf.supported_model_types()}")
            return 2
        input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), device=device,
                                  generator=torch.Generator().manual_seed(0) if device == "cpu" else None)
        compile_config = _compile_config(device, args.compile_backend) if args.compile else None
        _reset_compile()
        # each measurement is a warm-up (with --compile: the compile) and 2 x --repeats runs: say which one runs
        print(f"measuring transformers (default): prefill and generate, {args.repeats} runs each ...", file=sys.stderr,
              flush=True)
        before = _measure(model, input_ids, args.new_tokens, args.repeats, compile_config)
        counters_before = _compile_counters()
        profile = args.breakdown and not args.compile
        steps = [_decode_step(model, input_ids, device)] if profile else []
        moe_kernels.hf.apply(model, backend=args.backend)
        _reset_compile()  # the patched forward compiles afresh
        print("measuring moe_kernels (patched) ...", file=sys.stderr, flush=True)
        after = _measure(model, input_ids, args.new_tokens, args.repeats, compile_config)
        counters_after = _compile_counters()
        if profile:
            steps.append(_decode_step(model, input_ids, device))
        graphed = None
        if args.decode_graphs and not args.compile:
            from moe_kernels import decode_graphs

            os.environ[decode_graphs.ENV] = "1"
            print("measuring moe_kernels (patched) with decode graphs ...", file=sys.stderr, flush=True)
            try:
                graphed = _measure(model, input_ids, args.new_tokens, args.repeats)
            finally:
                os.environ.pop(decode_graphs.ENV)
                decode_graphs.clear()

    same = torch.equal(before[2], after[2])
    decoding = "compiled, static cache" if args.compile else "eager, dynamic cache"
    source = args.checkpoint or f"a temporary random-weight checkpoint (--size {size})"
    print(f"{model.config.model_type} from {source}, "
          f"{args.dtype}, {device}, batch {args.batch} x {args.tokens} prompt tokens, {args.new_tokens} new tokens, "
          f"decoding {decoding}")
    print(f"{'':<26}{'prefill tok/s':>14}{'decode tok/s':>14}")
    print(f"{'transformers (default)':<26}{before[0]:>14.1f}{before[1]:>14.1f}")
    print(f"{'moe_kernels (patched)':<26}{after[0]:>14.1f}{after[1]:>14.1f}")
    if graphed is not None:
        print(f"{'  + decode graphs':<26}{graphed[0]:>14.1f}{graphed[1]:>14.1f}   "
              f"(decode {graphed[1] / before[1]:.2f}x; greedy tokens "
              f"{'identical' if torch.equal(graphed[2], after[2]) else 'DIFFER'} to the patched model's)")
    if same:
        agreement = "identical"
    else:
        differ = (before[2] != after[2]).any(dim=0).nonzero()
        agreement = f"DIFFER from position {differ[0].item() - args.tokens} of the new tokens"
    print(f"speed-up: prefill {after[0] / before[0]:.2f}x, decode {after[1] / before[1]:.2f}x; "
          f"greedy tokens {agreement}")
    if any(math.isnan(run[1]) for run in (before, after, graphed) if run is not None):
        print("(decode tok/s nan: the prefill alone timed slower than the whole generate, so these timings are noise; "
              "rerun with more --repeats, more --new-tokens or on an idle machine)")
    if args.compile:
        print(f"compile, transformers: {counters_before}; patched: {counters_after}")
    if steps:
        events = "kernels" if device == "cuda" else "operators (CPU: figures of the host alone)"
        print(f"one eager decode step, {events} per step:")
        print(f"{'':<26}{'launches':>10}{'kernels ms':>12}{'wall ms':>10}{'GPU idle':>10}")
        for label, step in zip(("transformers (default)", "moe_kernels (patched)"), steps):
            print(_step_line(label, step))
        ranked = sorted(steps[1]["kernels"].items(), key=lambda item: -item[1][1])[:8]
        print("patched step, top kernels: " + "; ".join(f"{name[:60]} x{count:.0f} {ms:.3f} ms"
                                                         for name, (count, ms) in ranked))
    if not same and dtype != torch.float32:
        print(f"(in {args.dtype} a late divergence can be rounding; tests/test_gpu_hf_models.py checks near ties)")
        return 0
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
