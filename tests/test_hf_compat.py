"""moe_kernels.hf.compat against the installed transformers.

CI runs this file with the pinned transformers (constraints.txt), the oldest the package declares
(constraints-oldest.txt) and the newest release: each assumption compat.py makes about transformers is
checked here, so a release that moves one fails with its name.
"""

import dataclasses
import importlib
import inspect
import pathlib
import pkgutil
import re

import pytest

transformers = pytest.importorskip("transformers")

from packaging.version import Version  # noqa: E402

from moe_kernels.hf import compat  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_installed_transformers_is_supported():
    assert compat.TRANSFORMERS_VERSION >= Version(compat.MIN_TRANSFORMERS), \
        f"transformers {transformers.__version__} is older than the supported {compat.MIN_TRANSFORMERS}"


def test_declared_floor_matches_compat_and_the_oldest_ci_set():
    pyproject = ROOT / "pyproject.toml"
    oldest = ROOT / "constraints-oldest.txt"
    if not pyproject.exists() or not oldest.exists():
        pytest.skip("not run from a source checkout")
    floors = set(re.findall(r'"transformers>=([0-9.]+)"', pyproject.read_text()))
    assert floors and all(Version(f) == Version(compat.MIN_TRANSFORMERS) for f in floors), floors
    pinned = re.search(r"^transformers==([0-9.]+)", oldest.read_text(), re.M)
    assert pinned and Version(pinned.group(1)) == Version(compat.MIN_TRANSFORMERS)


def test_cache_kwarg_follows_the_version():
    expected = "cache" if compat.TRANSFORMERS_VERSION.release >= (5, 24) else "past_key_values"
    assert compat.CACHE_KWARG == expected
    assert compat.cache_kwargs(3) == {expected: 3}


def _cache_callables():
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2Model

    return {"create_causal_mask": create_causal_mask,
            "create_sliding_window_causal_mask": create_sliding_window_causal_mask,
            "LlamaDecoderLayer.forward": LlamaDecoderLayer.forward, "LlamaModel.forward": LlamaModel.forward,
            "MistralDecoderLayer.forward": MistralDecoderLayer.forward,
            "Qwen2DecoderLayer.forward": Qwen2DecoderLayer.forward, "Qwen2Model.forward": Qwen2Model.forward}


@pytest.mark.parametrize("name", sorted(_cache_callables()))
def test_transformers_takes_the_cache_under_that_name(name):
    # Layers take **kwargs: a wrong name would be swallowed silently, so the parameter must exist by name.
    params = inspect.signature(_cache_callables()[name]).parameters
    assert compat.CACHE_KWARG in params, f"{name}{inspect.signature(_cache_callables()[name])}"


def test_default_apply_gate_is_there():
    gate = compat.default_apply_gate()
    assert callable(gate)


def _model_output_classes():
    import moe_kernels

    found = []
    for info in pkgutil.walk_packages(moe_kernels.__path__, "moe_kernels."):
        if ".triton" in info.name or info.name.endswith("check"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            # Classes made with dataclasses.make_dataclass do not carry their module's name: keep every
            # ModelOutput subclass a module of ours holds that is not transformers' own.
            if isinstance(value, type) and issubclass(value, transformers.utils.ModelOutput) \
                    and not value.__module__.startswith("transformers") and value not in found:
                found.append(value)
    return found


def test_no_model_output_declares_a_renamed_field():
    # transformers >= 5.24 rewrites past_key_values= / cache_params= into cache= in every ModelOutput's
    # constructor, so a field of either old name cannot be set at all (before 5.24 either name works).
    classes = _model_output_classes()
    assert {c.__name__ for c in classes} >= {"CoupledCausalLMOutput", "FusedCausalLMOutput"}
    if compat.CACHE_KWARG != "cache":
        pytest.skip(f"transformers {transformers.__version__} does not rename the cache argument")
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & {"past_key_values", "cache_params"}, (cls.__name__, names)


def test_composed_models_follow_the_same_cache_rule():
    # moe_kernels.models repeats the rule (it is imported while moe_kernels.hf initialises); the two must agree.
    common = pytest.importorskip("moe_kernels.models._common")
    assert common.CACHE_FIELD == compat.CACHE_KWARG


@pytest.mark.parametrize("path", ["moe_kernels.hf.couple:CoupledCausalLMOutput",
                                  "moe_kernels.models.ultrafuser.fuser:FusedCausalLMOutput"])
def test_outputs_keep_the_cache_under_both_names(path):
    module, name = path.split(":")
    cls = getattr(importlib.import_module(module), name)
    sentinel = object()
    out = cls(cache=sentinel)
    assert out.cache is sentinel and out.past_key_values is sentinel and out["cache"] is sentinel


# PreTrainedModel methods the composed models (moe_kernels/models/_common.py) override or call, with the parameters
# they use: an override of a renamed method would silently stop running (a checkpoint missing a shared tensor would
# load again as an empty meta tensor), a renamed helper would break resize_token_embeddings.
_PRETRAINED_MODEL_METHODS = {
    "mark_tied_weights_as_initialized": ["loading_info"],
    "_get_resized_embeddings": ["old_embeddings", "new_num_tokens", "mean_resizing"],
    "_get_resized_lm_head": ["old_lm_head", "new_num_tokens", "mean_resizing"],
    "_adjust_bias": ["output_embeddings", "input_embeddings"],
    "get_expanded_tied_weights_keys": ["all_submodels"],
}


@pytest.mark.parametrize("name", sorted(_PRETRAINED_MODEL_METHODS))
def test_pretrained_model_methods_the_composed_models_use(name):
    method = getattr(transformers.PreTrainedModel, name, None)
    assert callable(method), f"transformers {transformers.__version__}: PreTrainedModel.{name} is gone"
    params = inspect.signature(method).parameters
    missing = [p for p in _PRETRAINED_MODEL_METHODS[name] if p not in params]
    assert not missing, f"PreTrainedModel.{name}{inspect.signature(method)} lacks {missing}"
