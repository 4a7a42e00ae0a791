"""The README's research-systems snippet and the four systems' examples in integration/ run as written."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ["example_pesc.py", "example_self_moe.py", "example_ccoe.py", "example_ultrafuser.py"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)  # this checkout; one thread (tiny shapes)
    env.pop("MOE_KERNELS_BACKEND", None)
    return env


def research_systems_snippet() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## The research systems"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the research-systems section has no python snippet"
    return "\n".join(blocks)


def test_readme_research_systems_snippet_runs(tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(research_systems_snippet())
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=str(tmp_path),
                            env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("PescForCausalLM", "SelfMoEForCausalLM", "CcoeForCausalLM", "UltraFuserForCausalLM"):
        assert name in result.stdout


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs_as_written(example):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "integration", example)], capture_output=True,
                            text=True, cwd=ROOT, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
