"""The README's Python snippets (Quickstart and research systems) and the four systems' examples in integration/ run
as written (all in one fresh interpreter, to pay the torch/transformers import once), and so does the
expert-parallel example with the README's torchrun command."""

import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ["example_pesc.py", "example_self_moe.py", "example_ccoe.py", "example_ultrafuser.py"]

DRIVER = r'''
import runpy, sys, traceback
failed = []
for path in sys.argv[1:]:
    sys.argv = [path]
    print(f"=== running {path}", flush=True)
    try:
        runpy.run_path(path, run_name="__main__")
    except BaseException:
        traceback.print_exc()
        failed.append(path)
print("FAILED:", failed, flush=True)
sys.exit(1 if failed else 0)
'''


def readme_section(title: str) -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index(f"## {title}\n"):]
    return section[:section.index("\n## ", 1)]


def python_blocks(title: str) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", readme_section(title), flags=re.S)
    assert blocks, f"the README's {title!r} section has no python snippet"
    return blocks


def research_systems_snippet() -> str:
    return "\n".join(python_blocks("The research systems"))


def test_readme_snippet_and_examples_run_as_written(tmp_path):
    # each Quickstart block on its own (a reader may paste either alone), then the research systems' snippet
    quickstart = python_blocks("Quickstart")
    assert len(quickstart) == 2, "the Quickstart has a block this test does not check: add its check below"
    snippets = [(f"readme_quickstart_{i}.py", block) for i, block in enumerate(quickstart)]
    snippets.append(("readme_research_systems.py", research_systems_snippet()))
    for name, text in snippets:
        (tmp_path / name).write_text(text)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)  # this checkout; one thread (tiny shapes)
    env.pop("MOE_KERNELS_BACKEND", None)
    paths = [str(tmp_path / name) for name, _ in snippets] + [os.path.join(ROOT, "integration", e) for e in EXAMPLES]
    result = subprocess.run([sys.executable, "-c", DRIVER, *paths], capture_output=True, text=True, cwd=str(tmp_path),
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "FAILED: []" in result.stdout
    # the first Quickstart block ends by printing the backends available here (CPU: reference and cpu at least)
    quickstart_out = result.stdout.split("=== running")[1]
    assert "'reference'" in quickstart_out and "'cpu'" in quickstart_out, quickstart_out
    for name in ("PescForCausalLM", "SelfMoEForCausalLM", "CcoeForCausalLM", "UltraFuserForCausalLM"):
        assert name in result.stdout


def test_quickstart_hf_block_patches_the_model(monkeypatch):
    """The README's Hugging Face block does what its comment says: after moe_kernels.hf.apply the router and the
    experts run moe_kernels' ops (the cpu backend here), revert takes them out again, and the logits stay those of
    transformers' own path."""
    from torch.profiler import profile

    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)
    namespace = {}
    exec(python_blocks("Quickstart")[1], namespace)  # noqa: S102 - the README's own text
    model = namespace["model"].eval()
    ids = torch.randint(0, 100, (1, 6))

    def run():
        with torch.no_grad(), profile() as prof:
            logits = model(ids).logits
        return logits, {e.key for e in prof.key_averages() if e.key.startswith("moe_kernels::")}

    patched, ops = run()
    assert {"moe_kernels::route_forward", "moe_kernels::expert_mlp_forward"} <= ops, ops
    namespace["moe_kernels"].hf.revert(model)
    plain, ops = run()
    assert not ops, ops
    torch.testing.assert_close(patched, plain, rtol=1e-5, atol=1e-5)


def test_expert_parallel_example_runs_with_torchrun():
    """The README's (and the example's docstring's) CPU command: torchrun, 2 gloo ranks, 20 steps of training."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("MOE_KERNELS_BACKEND", None)
    command = "torchrun --nproc_per_node=2 integration/example_expert_parallel.py"
    assert command in readme_section("Expert parallelism"), "the README's command changed: change it here too"
    # `python -m torch.distributed.run` is torchrun, with this interpreter whatever PATH holds
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", *command.split()[1:]], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    losses = [float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) >= 2 and losses[-1] < losses[0], result.stdout
    assert "done: 8 experts over 2 ranks" in result.stdout, result.stdout


def test_hf_speed_example_runs_eager_and_compiled():
    """integration/example_hf_speed.py (the GPU check's whole-model step) runs on the CPU at a tiny size, with eager
    and with compiled static-cache decoding, and its patched model gives the unpatched model's greedy tokens; the eager
    run profiles a decode step of each model (--breakdown), where the patched step runs moe_kernels' expert op."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("MOE_KERNELS_BACKEND", None)
    script = os.path.join(ROOT, "integration", "example_hf_speed.py")
    small = ["--tokens", "12", "--new-tokens", "4", "--batch", "2", "--repeats", "1"]
    for extra in (["--breakdown"], ["--compile", "--compile-backend", "aot_eager"]):
        result = subprocess.run([sys.executable, script, *small, *extra], capture_output=True, text=True, env=env,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert "greedy tokens identical" in result.stdout
        compiled = "--compile" in extra
        assert ("decoding compiled, static cache" in result.stdout) == compiled
        if not compiled:
            lines = result.stdout.splitlines()
            steps = {line.split()[0]: line.split()[-4:] for line in lines
                     if line.startswith(("transformers ", "moe_kernels ")) and len(line.split()) == 6}
            assert set(steps) == {"transformers", "moe_kernels"} and all(float(v[0]) > 0 for v in steps.values()), lines
            top = next(line for line in lines if line.startswith("patched step, top kernels:"))
            assert "moe_kernels" in top, top
        assert "--size tiny" in result.stdout
        if compiled:  # the compile counters of both models; the patched MoE layers compile without a graph break
            line = next(x for x in result.stdout.splitlines() if x.startswith("compile, transformers:"))
            assert line.split("patched:")[1].split(",")[1].strip() == "graph breaks 0", line
