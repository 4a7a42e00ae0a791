"""CCoE on Hugging Face causal LMs: couple domain-expert models on one shared backbone.

The experts are fine-tuned copies of one base model whose lower layers stayed frozen (the CCoE
recipe). :func:`couple_experts` keeps the base's embeddings and decoder layers below the deepest CoE
layer once (the shared backbone) and attaches each expert's own layers from its CoE layer depth on (its
own depth), final norm and LM head as a branch of a :class:`moe_kernels.layers.CoELayer`; experts may
branch off at different depths (``coe_layers={name: depth}``), giving several CoE layers. It returns a
:class:`moe_kernels.models.CcoeForCausalLM`: a Hugging Face model (save/load, ``generate``), with
per-request routing by the caller (``expert=``), a rule-based :class:`KeywordRouter` or a
:class:`ClassifierRouter` trained on the backbone's pooled hidden state, a per-step multi-expert mode,
and :meth:`~moe_kernels.models.CcoeForCausalLM.train_expert` to fine-tune one branch alone. The routing
is reported on every output.

:class:`CoupledExperts` is the earlier plain-module form (one CoE layer, its own decoding loop), kept as
the reference the model is tested against.

Supported: decoder-only transformers 5.x models whose decoder has ``embed_tokens``, ``layers``,
``norm`` and ``rotary_emb`` (Llama, Mistral, Qwen2, Qwen3, ...), eager or SDPA attention.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..layers.coe import CoELayer
from ..models.ccoe.branch import (ExpertBranch, attention_types, build_attention_masks, decoder_parts,
                                  modules_equal, run_decoder_layers, unique_param_bytes)
from ..models.generation import decode_with_cache, generation_defaults

# Config entries that may differ between the base and an expert: depth and bookkeeping.
_CONFIG_KEYS_ALLOWED_TO_DIFFER = {
    "num_hidden_layers", "layer_types", "max_window_layers", "_name_or_path", "name_or_path",
    "transformers_version", "architectures", "torch_dtype", "dtype", "_attn_implementation_autoset",
    "_commit_hash", "output_hidden_states", "output_attentions", "return_dict", "use_cache",
}


@dataclass
class CoupledCausalLMOutput(ModelOutput):
    """Output of :class:`CoupledExperts`: the causal-LM fields plus the routing.

    logits [B, L, V]; loss (scalar, when labels were given); cache (:class:`CoECache`, also readable as
    ``past_key_values``); expert_ids [B] int64 (index into the model's expert_names); expert_names: the
    chosen expert per sequence.

    The field is ``cache``, not ``past_key_values``: transformers >= 5.24 rewrites ``past_key_values=`` into
    ``cache=`` in every ModelOutput's constructor (moe_kernels.hf.compat).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    expert_ids: torch.Tensor | None = None
    expert_names: list | None = None

    @property
    def past_key_values(self):
        return self.cache


@dataclass
class CoupledGenerateOutput(ModelOutput):
    sequences: torch.Tensor | None = None
    expert_names: list | None = None


class CoECache:
    """KV caches of a coupled model: one for the shared backbone (whole batch) and one per expert
    branch (its sub-batch only), plus the routing fixed at the prompt."""

    def __init__(self, backbone, branches: dict, names: list[str]):
        self.backbone = backbone
        self.branches = branches
        self.names = list(names)
        self.expert_ids: torch.Tensor | None = None
        self.seen_tokens = 0

    def get_seq_length(self) -> int:
        return self.seen_tokens


def _first_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def check_same_architecture(base_class: type, base_config, base_dtype: torch.dtype, expert: nn.Module, name: str,
                            split_layer: int) -> None:
    """Raise ValueError unless ``expert`` is the base's architecture (depth may differ, >= split_layer)."""
    if type(expert) is not base_class:
        raise ValueError(f"expert {name!r} is a {type(expert).__name__} but the base model is a "
                         f"{base_class.__name__}; CCoE experts must share the base's architecture")
    expert_config = expert.config.to_dict()
    base_types = attention_types(base_config, split_layer)
    base_config = base_config.to_dict()
    differing = sorted(key for key in set(base_config) | set(expert_config)
                       if key not in _CONFIG_KEYS_ALLOWED_TO_DIFFER and base_config.get(key) != expert_config.get(key))
    if differing:
        details = ", ".join(f"{k}: base={base_config.get(k)!r} expert={expert_config.get(k)!r}" for k in differing[:6])
        raise ValueError(f"expert {name!r} does not share the base's architecture ({details})")
    depth = expert.config.num_hidden_layers
    if depth < split_layer:
        raise ValueError(f"expert {name!r} has {depth} layers, fewer than split_layer = {split_layer}")
    if attention_types(expert.config, split_layer) != base_types:
        raise ValueError(f"expert {name!r} has different attention types (layer_types) below split_layer")
    if _first_dtype(expert) != base_dtype:
        raise ValueError(f"expert {name!r} has dtype {_first_dtype(expert)} but the base has {base_dtype}")


def pooled_hidden(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of [B, L, H] over the non-padding tokens -> [B, H] float32."""
    hidden = hidden_states.float()
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask[:, -hidden.shape[1]:].to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class KeywordRouter:
    """Rule-based router: the first domain (in ``rules`` order) with a pattern found in the prompt wins.

    rules: {domain: [regex or keyword, ...]} (case-insensitive ``re.search``); default: the domain for
    prompts matching no rule (None: such a prompt is an error); decode: ``token ids -> text`` (e.g. a
    tokenizer's ``decode``), needed to route token ids inside the model.
    """

    def __init__(self, rules: dict[str, Sequence[str]], default: str | None = None,
                 decode: Callable[[list[int]], str] | None = None):
        if not isinstance(rules, dict) or not rules:
            raise ValueError("rules must be a non-empty dict {domain: [patterns]}")
        self.rules = {domain: [re.compile(p, re.IGNORECASE) if isinstance(p, str) else p for p in patterns]
                      for domain, patterns in rules.items()}
        self.default = default
        self.decode = decode

    def route_text(self, text: str) -> str:
        for domain, patterns in self.rules.items():
            if any(p.search(text) for p in patterns):
                return domain
        if self.default is None:
            raise ValueError(f"no routing rule matches the prompt {text[:60]!r} and the router has no default")
        return self.default

    def route_texts(self, texts: Sequence[str]) -> list[str]:
        return [self.route_text(t) for t in texts]

    def choose(self, model, input_ids, attention_mask, prefix_hidden) -> list[str]:
        if self.decode is None:
            raise ValueError("KeywordRouter needs decode= (token ids -> text) to route token ids; "
                             "or route texts with route_texts() and pass expert= to the model")
        rows = input_ids.tolist() if attention_mask is None else \
            [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]
        return self.route_texts([self.decode(r) for r in rows])


class ClassifierRouter(nn.Module):
    """Learned router: a linear classifier on the shared backbone's pooled (masked mean) hidden state.

    Features are standardised with statistics taken in :meth:`fit`. ``names`` are the domains it
    chooses among (they must be attached experts when it routes).
    """

    def __init__(self, hidden_size: int, names: Sequence[str]):
        super().__init__()
        if not names:
            raise ValueError("names must list at least one expert")
        self.names = list(names)
        self.classifier = nn.Linear(hidden_size, len(self.names))
        self.register_buffer("feature_mean", torch.zeros(hidden_size))
        self.register_buffer("feature_std", torch.ones(hidden_size))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, H] -> logits [B, len(names)]."""
        weight = self.classifier.weight
        return self.classifier(((pooled - self.feature_mean) / self.feature_std).to(weight.dtype))

    def choose(self, model, input_ids, attention_mask, prefix_hidden) -> list[str]:
        with torch.no_grad():
            picks = self(pooled_hidden(prefix_hidden, attention_mask)).argmax(-1).tolist()
        return [self.names[i] for i in picks]

    def fit(self, model: "CoupledExperts", input_ids: torch.Tensor, labels: Sequence[str],
            attention_mask: torch.Tensor | None = None, steps: int = 200, lr: float = 0.05) -> list[float]:
        """Train on labelled prompts (input_ids [N, L], one domain name per prompt); the backbone is
        frozen (features computed once). Returns the loss of each step."""
        unknown = sorted(set(labels) - set(self.names))
        if unknown:
            raise ValueError(f"labels contain domains the router does not know: {unknown}; known: {self.names}")
        if len(labels) != input_ids.shape[0]:
            raise ValueError(f"labels has {len(labels)} entries but input_ids has {input_ids.shape[0]} prompts")
        with torch.no_grad():
            features = pooled_hidden(model.prefix_hidden(input_ids, attention_mask), attention_mask)
            self.feature_mean.copy_(features.mean(0))
            self.feature_std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
        targets = torch.tensor([self.names.index(n) for n in labels], device=features.device)
        optimizer = torch.optim.Adam(self.classifier.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            loss = F.cross_entropy(self(features).float(), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses


class CoupledExperts(nn.Module):
    """Expert LLMs coupled at one CoE layer, called like a causal LM, with its own decoding loop.

    The earlier, plain-module form; :func:`couple_experts` now returns
    :class:`moe_kernels.models.CcoeForCausalLM` (several CoE layers, multi-expert routing, save/load,
    transformers' ``generate``). Kept as the reference decoder the new model is tested against.

    ``forward(input_ids [B, L], attention_mask [B, S] = None, position_ids = None, past_key_values = None,
    use_cache = False, labels = None, expert = None)`` -> :class:`CoupledCausalLMOutput`. ``expert``: one
    name for the whole batch, one name (or id) per sequence, or None to ask :attr:`router`. With a cache,
    the routing chosen at the prompt is kept for the following steps.
    """

    def __init__(self, base_model: nn.Module, split_layer: int, router=None):
        super().__init__()
        decoder, head = decoder_parts(base_model, "base_model")
        depth = base_model.config.num_hidden_layers
        if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 0 <= split_layer <= depth:
            raise ValueError(f"split_layer must be an int in [0, {depth}] (the base has {depth} layers), "
                             f"got {split_layer!r}")
        self.config = base_model.config
        self.split_layer = split_layer
        self.embed_tokens = decoder.embed_tokens
        self.layers = nn.ModuleList(decoder.layers[:split_layer])
        self.rotary_emb = decoder.rotary_emb
        self.coe = CoELayer()
        self.router = router
        self.last_routing: list[str] | None = None
        self._layer_indices = list(range(split_layer))
        self._layer_types = attention_types(self.config, split_layer)
        # What is kept of the base (not its upper layers): its identity, to check new experts, and its final
        # norm and head, to share them with experts whose own are equal. Not registered as submodules.
        self._base = {"class": type(base_model), "dtype": _first_dtype(base_model), "norm": decoder.norm,
                      "head": head, "generation_config": getattr(base_model, "generation_config", None)}
        self._separate_bytes: dict[str, int] = {}

    # ----- experts -----
    @property
    def expert_names(self) -> list[str]:
        return self.coe.names

    def push_expert(self, name: str, model: nn.Module, verify_prefix: bool = True) -> None:
        """Attach ``model`` as expert ``name`` (its layers from split_layer on, its norm and head;
        shared with the base where equal). ``verify_prefix`` checks that its embeddings and lower
        layers equal the base's, as CCoE's frozen-prefix training guarantees."""
        check_same_architecture(self._base["class"], self.config, self._base["dtype"], model, name, self.split_layer)
        decoder, head = decoder_parts(model, f"expert {name!r}")
        if verify_prefix:
            if not modules_equal(self.embed_tokens, decoder.embed_tokens):
                raise ValueError(f"expert {name!r} has embeddings that differ from the base's; the shared backbone "
                                 "would change its outputs (pass verify_prefix=False to couple anyway)")
            for index in range(self.split_layer):
                if not modules_equal(self.layers[index], decoder.layers[index]):
                    raise ValueError(f"expert {name!r} layer {index} (below split_layer = {self.split_layer}) differs "
                                     "from the base's (pass verify_prefix=False to couple anyway)")
        norm = self._base["norm"] if modules_equal(self._base["norm"], decoder.norm) else decoder.norm
        lm_head = self._base["head"] if modules_equal(self._base["head"], head) else head
        branch = ExpertBranch(nn.ModuleList(decoder.layers[self.split_layer:]), norm, lm_head, model.config,
                              self.split_layer)
        self.coe.add_branch(name, branch)
        self._separate_bytes[name] = unique_param_bytes(model)

    def pop_expert(self, name: str) -> ExpertBranch:
        """Detach expert ``name``; the others are untouched. Returns its branch."""
        branch = self.coe.remove_branch(name)
        del self._separate_bytes[name]
        return branch

    def memory_report(self) -> dict:
        """Parameter bytes the coupled model keeps alive (backbone, branches, router, and the base's norm
        and head kept for sharing) vs keeping each attached expert as a full model."""
        coupled = unique_param_bytes(self, self._base["norm"], self._base["head"])
        separate = sum(self._separate_bytes.values())
        return {"experts": len(self._separate_bytes), "separate_bytes": separate, "coupled_bytes": coupled,
                "saved_bytes": separate - coupled,
                "saved_fraction": (separate - coupled) / separate if separate else 0.0}

    # ----- forward -----
    @property
    def generation_config(self):
        """The base model's generation config (eos/pad defaults of :meth:`generate`)."""
        return self._base["generation_config"]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def _backbone(self, input_ids, attention_mask, position_ids, cache, use_cache):
        hidden = self.embed_tokens(input_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        masks = build_attention_masks(self.config, hidden, attention_mask, cache, position_ids,
                                      self._layer_indices, self._layer_types)
        hidden = run_decoder_layers(self.layers, self._layer_indices, self._layer_types, hidden, masks,
                                    position_embeddings, position_ids, cache, use_cache)
        return hidden, position_embeddings

    def prefix_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The shared backbone's output [B, L, H] (the CoE layer's input) for prompts, without cache."""
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return self._backbone(input_ids, attention_mask, position_ids, None, False)[0]

    def _expert_ids(self, expert, input_ids, attention_mask, hidden) -> torch.Tensor:
        names, batch_size = self.expert_names, input_ids.shape[0]
        if expert is None:
            if self.router is None:
                raise ValueError("no router is set: pass expert= (a name, or one per sequence) or set model.router")
            expert = self.router.choose(self, input_ids, attention_mask, hidden)
        if isinstance(expert, torch.Tensor):
            ids = expert.to(device=input_ids.device, dtype=torch.long).reshape(-1)
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < len(names)):
                raise ValueError(f"expert ids must lie in [0, {len(names)}), got {ids.tolist()}")
        else:
            if isinstance(expert, (str, int)):
                expert = [expert] * batch_size
            ids = []
            for e in expert:
                if isinstance(e, str):
                    if e not in names:
                        raise ValueError(f"expert {e!r} is not attached; attached experts: {names}")
                    ids.append(names.index(e))
                elif isinstance(e, int) and 0 <= e < len(names):
                    ids.append(e)
                else:
                    raise ValueError(f"expert must be a name in {names} or an id in [0, {len(names)}), got {e!r}")
            ids = torch.tensor(ids, dtype=torch.long, device=input_ids.device)
        if ids.shape != (batch_size,):
            raise ValueError(f"expert gives {ids.numel()} choices for a batch of {batch_size} sequences")
        return ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: CoECache | None = None,
                use_cache: bool = False, labels: torch.Tensor | None = None, expert=None) -> CoupledCausalLMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        cache = past_key_values
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = CoECache(DynamicCache(config=self.config), self.coe.new_caches(), self.expert_names)
        if cache is not None and cache.names != self.expert_names:
            raise ValueError("the experts changed (push/pop) since this cache was made; start a new one")
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        hidden, position_embeddings = self._backbone(input_ids, attention_mask, position_ids,
                                                     None if cache is None else cache.backbone, use_cache)
        if cache is not None and cache.expert_ids is not None:
            if expert is not None:
                raise ValueError("this cache already fixed the routing at the prompt; do not pass expert= again")
            expert_ids = cache.expert_ids
        else:
            expert_ids = self._expert_ids(expert, input_ids, attention_mask, hidden)
            if cache is not None:
                cache.expert_ids = expert_ids
        logits = self.coe(hidden, expert_ids, attention_mask, position_ids, position_embeddings,
                          None if cache is None else cache.branches, use_cache)
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        names = self.expert_names
        return CoupledCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                                     expert_ids=expert_ids, expert_names=[names[i] for i in expert_ids.tolist()])

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """The expert the router picks for each prompt."""
        return self.router.choose(self, input_ids, attention_mask, self.prefix_hidden(input_ids, attention_mask)) \
            if self.router is not None else self._expert_ids(None, input_ids, attention_mask, None)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, expert=None,
                 max_new_tokens: int = 20, eos_token_id=None, pad_token_id=None,
                 return_dict_in_generate: bool = False, **decode_kwargs):
        """Greedy (default) or sampled decoding with one KV cache per branch; routing is decided once
        on the prompt (``expert=`` or the router) and stored in :attr:`last_routing`. eos/pad default
        to the base model's generation config. Returns sequences [B, L + n] (or
        :class:`CoupledGenerateOutput` with ``return_dict_in_generate``)."""
        eos_token_id, pad_token_id = generation_defaults(self, eos_token_id, pad_token_id)
        sequences, prefill = decode_with_cache(self, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                               eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                               expert=expert, **decode_kwargs)
        self.last_routing = prefill.expert_names
        if return_dict_in_generate:
            return CoupledGenerateOutput(sequences=sequences, expert_names=prefill.expert_names)
        return sequences


def couple_experts(base_model: nn.Module, experts: dict[str, nn.Module], split_layer: int | None = None, router=None,
                   verify_prefix: bool = True, *, coe_layers: dict[str, int] | None = None, multi_expert: int = 1):
    """Couple expert models (fine-tuned copies of ``base_model``) on the base's shared backbone.

    ``split_layer``: one CoE layer at that depth for every expert; or ``coe_layers={name: depth}``: each
    expert branches off at its own depth (several CoE layers). The backbone keeps the embeddings and the
    base's layers below the deepest CoE layer once; each expert keeps its layers from its depth on (any
    depth of its own), its final norm and its LM head. ``router``: a :class:`KeywordRouter`, a
    :class:`ClassifierRouter`, or None (then pass ``expert=`` on calls). ``multi_expert``: with a
    ClassifierRouter, route each request to its top ``multi_expert`` experts, switched per step (see
    :class:`moe_kernels.models.CcoeForCausalLM`).

    Returns a :class:`moe_kernels.models.CcoeForCausalLM` (``generate``, ``save_pretrained`` /
    ``AutoModelForCausalLM.from_pretrained`` work on it). It shares modules with the given models (no
    copies, except a part some other part of the model already holds); drop the full models to realise
    the memory saving reported by ``memory_report``.
    """
    from ..models.ccoe import CcoeConfig, CcoeForCausalLM

    if not isinstance(experts, dict) or not experts:
        raise ValueError("experts must be a non-empty dict {name: model}")
    if (split_layer is None) == (coe_layers is None):
        raise ValueError("give exactly one of split_layer (one CoE layer for all experts) or coe_layers "
                         "({name: depth})")
    decoder_parts(base_model, "base_model")
    depth = base_model.config.num_hidden_layers
    if coe_layers is None:
        coe_layers = {name: split_layer for name in experts}
    if sorted(coe_layers) != sorted(experts):
        raise ValueError(f"coe_layers must give a depth for every expert: experts {sorted(experts)}, "
                         f"coe_layers {sorted(coe_layers)}")
    for name, d in coe_layers.items():
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= depth:
            what = "split_layer" if split_layer is not None else f"coe_layers[{name!r}]"
            raise ValueError(f"{what} must be an int in [0, {depth}] (the base has {depth} layers), got {d!r}")
    config = CcoeConfig(text_config=base_model.config, backbone_depth=max(coe_layers.values()),
                        multi_expert=multi_expert)
    coupled = CcoeForCausalLM(config, base_model=base_model, router=router)
    for name, model in experts.items():
        coupled.push_expert(name, model, coe_layer=coe_layers[name], verify_prefix=verify_prefix)
    generation_config = getattr(base_model, "generation_config", None)
    if generation_config is not None:
        coupled.generation_config = copy.deepcopy(generation_config)
    return coupled.train(base_model.training)
