"""The moe-kernels command: info, demo and the delegated commands run and report what they should."""

import pytest

from moe_kernels.cli import main

pytest.importorskip("transformers")


def test_info_lists_backends_and_families(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "reference  built" in out
    assert "mixtral" in out and "Hugging Face families" in out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_agrees_with_transformers(capsys, dtype):
    code = main(["demo", "--tokens", "24", "--hidden", "32", "--intermediate", "16", "--experts", "5",
                 "--top-k", "2", "--repeats", "1", "--dtype", dtype])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out
    assert "-> AGREE" in out and "transformers grouped_mm" in out
    # the timing runs say what they are doing (the default size is tens of seconds on a small CPU), on stderr
    assert "timing transformers grouped_mm" in captured.err and "timing moe_kernels" in captured.err


def test_delegated_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["craft", "--help"])
    assert exc.value.code == 0
    assert "SRC_DIR" in capsys.readouterr().out


def test_tune_triton_is_its_own_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--triton", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "tune --triton" in out and "--shapes" in out and "--dry-run" in out
    with pytest.raises(SystemExit) as exc:  # a dry run writes only where --out says
        main(["tune", "--triton", "--dry-run"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def test_info_names_the_triton_config_tables(capsys):
    assert main(["info"]) == 0
    assert "Triton configs: " in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--top-k", "20"], "--top-k must satisfy 1 <= top-k <= --experts = 16"),
    (["--top-k", "0"], "--top-k must satisfy"),
    (["--device", "nonsense"], "--device 'nonsense'"),
])
def test_demo_refuses_bad_arguments_with_a_sentence(capsys, args, match):
    """Exit 2 and one line naming the argument, as tune and craft do (before: tracebacks from deep inside)."""
    assert main(["demo", "--repeats", "1", *args]) == 2
    assert match in capsys.readouterr().err
