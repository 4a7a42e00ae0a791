"""Load a local Hugging Face MoE checkpoint, patch it with moe_kernels, report tokens/s before and after.

    python integration/example_hf_speed.py [CHECKPOINT_DIR] [--tokens 256] [--batch 4] [--dtype float32]

CHECKPOINT_DIR is any local directory saved by ``save_pretrained`` of a supported family (see
``moe-kernels info``). Without one, a small random-weight Mixtral is saved to a temporary directory and
used, so the script runs as written on any machine. Measures prefill (forward over the whole batch) and
greedy decoding with the KV cache (medians of --repeats runs), unpatched (transformers' default experts
path) and patched, and checks that both give the same greedy tokens.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

import moe_kernels.hf  # noqa: E402


def _tiny_checkpoint(path: str) -> str:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=1024)
    MixtralForCausalLM(config).save_pretrained(path)
    return path


def _median_seconds(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _measure(model, input_ids, new_tokens: int, repeats: int):
    """(prefill tokens/s, decode tokens/s, generated ids): medians over ``repeats`` runs after a warm-up."""
    def generate():
        return model.generate(input_ids=input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model(input_ids=input_ids)
        generate()  # warm-up
        prefill_s, _ = _median_seconds(lambda: model(input_ids=input_ids), repeats)
        generate_s, out = _median_seconds(generate, repeats)
    # generate() includes one prefill: the decode rate counts only the steps after it
    decode_s = max(generate_s - prefill_s, 1e-9)
    return input_ids.numel() / prefill_s, input_ids.shape[0] * new_tokens / decode_s, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="local checkpoint directory")
    parser.add_argument("--tokens", type=int, default=128, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default=None, help="moe_kernels backend (default: chosen by device)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or _tiny_checkpoint(tmp)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        if model.config.model_type not in moe_kernels.hf.supported_model_types():
            print(f"{model.config.model_type} is not supported; supported: {moe_kernels.hf.supported_model_types()}")
            return 2
        input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), device=device,
                                  generator=torch.Generator().manual_seed(0) if device == "cpu" else None)
        before = _measure(model, input_ids, args.new_tokens, args.repeats)
        moe_kernels.hf.apply(model, backend=args.backend)
        after = _measure(model, input_ids, args.new_tokens, args.repeats)

    same = torch.equal(before[2], after[2])
    print(f"{model.config.model_type} from {args.checkpoint or 'a temporary random-weight checkpoint'}, "
          f"{args.dtype}, {device}, batch {args.batch} x {args.tokens} prompt tokens, {args.new_tokens} new tokens")
    print(f"{'':<26}{'prefill tok/s':>14}{'decode tok/s':>14}")
    print(f"{'transformers (default)':<26}{before[0]:>14.1f}{before[1]:>14.1f}")
    print(f"{'moe_kernels (patched)':<26}{after[0]:>14.1f}{after[1]:>14.1f}")
    print(f"speed-up: prefill {after[0] / before[0]:.2f}x, decode {after[1] / before[1]:.2f}x; "
          f"greedy tokens {'identical' if same else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
