"""The README's research-systems snippet and the four systems' examples in integration/ run as written
(all in one fresh interpreter, to pay the torch/transformers import once)."""

import os
import re
import subprocess
import sys

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


def research_systems_snippet() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## The research systems"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the research-systems section has no python snippet"
    return "\n".join(blocks)


def test_readme_snippet_and_examples_run_as_written(tmp_path):
    snippet = tmp_path / "readme_research_systems.py"
    snippet.write_text(research_systems_snippet())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)  # this checkout; one thread (tiny shapes)
    env.pop("MOE_KERNELS_BACKEND", None)
    paths = [str(snippet)] + [os.path.join(ROOT, "integration", e) for e in EXAMPLES]
    result = subprocess.run([sys.executable, "-c", DRIVER, *paths], capture_output=True, text=True, cwd=str(tmp_path),
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "FAILED: []" in result.stdout
    for name in ("PescForCausalLM", "SelfMoEForCausalLM", "CcoeForCausalLM", "UltraFuserForCausalLM"):
        assert name in result.stdout


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
