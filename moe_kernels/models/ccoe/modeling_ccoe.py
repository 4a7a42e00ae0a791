"""CCoE as a Hugging Face model: :class:`CcoeForCausalLM`.

Expert LLMs (fine-tuned copies of one base model whose lower layers stayed frozen) are coupled on the
base's shared backbone at CoE layers of one or more depths. An expert attached at depth ``d`` keeps its
own decoder layers ``d ..`` (any depth of its own), final norm and LM head (an :class:`ExpertBranch`,
:mod:`.branch`, dispatched to by a :class:`moe_kernels.layers.CoELayer`); the backbone (embeddings and the
base's layers ``0 .. d-1``) is kept once. Experts at several depths form several CoE layers: a sequence routed to an expert at depth
``d`` runs the backbone up to ``d`` and then that expert's branch, so it gets exactly what the expert's
full model computes for it.

Routing (decided on the prompt, kept for the following steps):

* one expert per request (default): ``expert=`` (one name, or one per sequence), else the router
  (:class:`KeywordRouter` rules or a learned :class:`ClassifierRouter`);
* multi-expert, per step (a request that spans domains): ``expert=[[names], ...]`` gives each sequence a
  set of active experts, or ``config.multi_expert = m`` takes the router's top m. Every active expert runs
  on the whole sequence with its own KV cache, and **the logits at position t come from the active expert
  that the ClassifierRouter scores highest on the mean backbone hidden state (CoE-input, first CoE layer)
  of the tokens 0..t** (padding excluded). At the last prompt token that is the prompt-level choice; as
  the generated text drifts into another domain, the choice follows it. Exact: the expert chosen at a
  step has seen the whole context.

Caches (:class:`CcoeCache`): one KV cache per backbone stage (the rows that still need it) and one per
active branch (its rows only). transformers' ``generate`` works unchanged (greedy, sampling, top-p,
beam search, streamers).
"""

from __future__ import annotations

import copy
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin

from ...layers.coe import CoELayer
from .._common import CACHE_FIELD, ComposedPreTrainedModel, forward_cache, output_class, train_steps
from .branch import (ExpertBranch, attention_types, build_attention_masks, decoder_parts, modules_equal,
                     run_decoder_layers, unique_param_bytes)
from .configuration_ccoe import CcoeConfig


def _select(t, rows: torch.Tensor | None):
    """Rows of a per-sequence tensor; broadcast tensors (batch 1) and None pass."""
    if t is None or rows is None or t.shape[0] == 1:
        return t
    return t.index_select(0, rows.to(t.device))


CcoeCausalLMOutput = output_class(
    "CcoeCausalLMOutput", ["loss", "logits", "cache", "expert_ids", "expert_names", "step_expert_ids"],
    """loss (with labels); logits [B, L, V]; cache (:class:`CcoeCache`); expert_ids [B] (one expert per
    request) or None; expert_names: the expert per sequence (one per request) or the list of active experts
    per sequence (multi-expert); step_expert_ids [B, L] (multi-expert: the expert whose logits each
    position has).""")


class Routing:
    """Which experts each sequence uses: ``active[b]`` = sorted expert ids of sequence b; pairs
    (pair_rows, pair_experts) list every (sequence, active expert), sorted by sequence then expert."""

    def __init__(self, active: list[list[int]], device):
        self.active = [sorted(set(a)) for a in active]
        rows = [b for b, a in enumerate(self.active) for _ in a]
        experts = [e for a in self.active for e in a]
        self.pair_rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.pair_experts = torch.tensor(experts, dtype=torch.long, device=device)
        self.single = all(len(a) == 1 for a in self.active)

    def check_reorder(self, beam_idx: torch.Tensor) -> None:
        for row, source in enumerate(beam_idx.tolist()):
            if self.active[source] != self.active[row]:
                raise ValueError("a beam moved between sequences routed to different experts; the routing is fixed "
                                 "per prompt, so beams of one prompt must share it")


class CcoeCache:
    """KV caches of a coupled model: one per backbone stage and one per active branch, each over the rows
    that use it (in batch order), plus the routing fixed at the prompt and, in multi-expert mode, the running
    sum of the backbone features for per-step routing."""

    is_compileable = False
    is_croppable = False

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.stages: dict[int, tuple[torch.Tensor, object]] = {}
        self.branches: dict[str, tuple[torch.Tensor, object]] = {}
        self.routing: Routing | None = None
        self.seen_tokens = 0
        self.feature_sum: torch.Tensor | None = None
        self.feature_count: torch.Tensor | None = None

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def sub_cache(self, store: dict, key, rows: torch.Tensor, make):
        if key not in store:
            store[key] = (rows, make())
        held_rows, cache = store[key]
        if not torch.equal(held_rows, rows):  # pragma: no cover - the routing is fixed, so the rows are too
            raise RuntimeError(f"cache rows of {key!r} changed between steps")
        return cache

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.long()
        if self.routing is not None:
            self.routing.check_reorder(beam_idx)
        for store in (self.stages, self.branches):
            for rows, cache in store.values():
                source = beam_idx.to(rows.device)[rows]  # new row r takes the state of old row beam_idx[r]
                positions = torch.searchsorted(rows, source)
                cache.reorder_cache(positions)
        if self.feature_sum is not None:
            self.feature_sum = self.feature_sum.index_select(0, beam_idx.to(self.feature_sum.device))
            self.feature_count = self.feature_count.index_select(0, beam_idx.to(self.feature_count.device))


class CcoeForCausalLM(ComposedPreTrainedModel, GenerationMixin):
    """Expert LLMs coupled at CoE layers on a shared backbone, a causal LM (see the module docstring).

    ``forward(input_ids [B, L], attention_mask=None, position_ids=None, cache=None, labels=None,
    use_cache=None, expert=None)`` -> :class:`CcoeCausalLMOutput`. ``expert``: one name (or id) for the
    batch, one per sequence, a list of names per sequence (multi-expert), or None to ask :attr:`router`.
    Build one with :func:`moe_kernels.hf.couple_experts`; attach/detach experts with :meth:`push_expert` /
    :meth:`pop_expert`; fine-tune one branch alone with :meth:`train_expert` (or
    :meth:`freeze_all_but_expert` in your own loop).
    """

    config_class = CcoeConfig

    def __init__(self, config: CcoeConfig, base_model: nn.Module | None = None, experts: dict | None = None,
                 router=None):
        super().__init__(config)
        from ...hf.couple import ClassifierRouter, KeywordRouter

        depths = config.depths
        if base_model is None:
            base_model = AutoModelForCausalLM.from_config(config.text_config)
        decoder, _ = decoder_parts(base_model, "base_model")
        base_depth = config.text_config.num_hidden_layers
        backbone_depth = max([int(config.backbone_depth or 0)] + depths)
        config.backbone_depth = backbone_depth
        if backbone_depth > base_depth:
            raise ValueError(f"a CoE layer at depth {backbone_depth} needs that many base layers; the base has "
                             f"{base_depth}")
        self._base_class = type(base_model)
        self.embed_tokens = decoder.embed_tokens
        self.rotary_emb = decoder.rotary_emb
        self.backbone = nn.ModuleList(decoder.layers[:backbone_depth])
        self._backbone_types = attention_types(config.text_config, max(backbone_depth, 1))
        self.coe_layers = nn.ModuleDict()
        self._no_split_modules = [type(decoder.layers[0]).__name__] if len(decoder.layers) else []
        self.last_routing = None
        names = list(config.expert_names)
        config.expert_names = []
        self._tied_weights_keys = {}
        for name in names:
            model = None if experts is None else experts[name]
            self._attach(name, model, config.coe_layers[name], config.expert_configs[name])
        if router is None and config.router_config:
            kind = config.router_config.get("type")
            if kind == "classifier":
                router = ClassifierRouter(config.text_config.hidden_size, config.router_config["names"])
            elif kind == "keyword":
                router = KeywordRouter(config.router_config["rules"], default=config.router_config.get("default"))
        self.router = router
        self.post_init()

    # ----- the router attribute: a module (ClassifierRouter), a plain object (KeywordRouter) or None -----
    def __setattr__(self, name, value):
        if name == "router":
            self._modules.pop("router", None)
            self.__dict__.pop("router", None)
            if isinstance(value, nn.Module):
                super().__setattr__(name, value)
            else:
                object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def _router_config(self):
        from ...hf.couple import ClassifierRouter, KeywordRouter

        router = getattr(self, "router", None)
        if isinstance(router, ClassifierRouter):
            return {"type": "classifier", "names": list(router.names)}
        if isinstance(router, KeywordRouter):
            return {"type": "keyword", "default": router.default,
                    "rules": {d: [p.pattern for p in ps] for d, ps in router.rules.items()}}
        return None

    def save_pretrained(self, *args, **kwargs):
        self.config.router_config = self._router_config()
        return super().save_pretrained(*args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own cache (per backbone stage and per branch)

    # ----- experts -----
    @property
    def expert_names(self) -> list[str]:
        return list(self.config.expert_names)

    def expert_depth(self, name: str) -> int:
        return self.config.coe_layers[name]

    def branch(self, name: str) -> ExpertBranch:
        if name not in self.config.coe_layers:
            raise KeyError(f"no expert named {name!r}; attached: {self.expert_names}")
        return self.coe_layers[str(self.config.coe_layers[name])].branches[name]

    # ----- parts shared between branches (a norm or LM head equal to another's is kept once) -----
    def _part_path(self, key: str) -> str:
        """Module path of a shared part: ``"embed_tokens"`` or ``"<expert>.norm"`` / ``"<expert>.lm_head"``."""
        if key == "embed_tokens":
            return "embed_tokens"
        expert, _, part = key.rpartition(".")
        return f"coe_layers.{self.config.coe_layers[expert]}.branches.{expert}.{part}"

    def _update_ties(self) -> None:
        """Declare the shared parts as tied weights, so save_pretrained writes each tensor once and
        from_pretrained ties them again."""
        mapping = {}
        attached = set(self.config.expert_names)
        for target, source in self.config.shared_parts.items():
            if any(key != "embed_tokens" and key.rpartition(".")[0] not in attached for key in (target, source)):
                continue  # still being built (from_pretrained attaches the experts one by one)
            target_path, source_path = self._part_path(target), self._part_path(source)
            source_module = self.get_submodule(source_path)
            if source == "embed_tokens":
                mapping[f"{target_path}.weight"] = f"{source_path}.weight"
                continue
            for param_name, _ in source_module.named_parameters():
                mapping[f"{target_path}.{param_name}"] = f"{source_path}.{param_name}"
        self._tied_weights_keys = mapping
        self.config.tie_word_embeddings = bool(mapping)
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    def _shared_module(self, source: str, like: nn.Module) -> nn.Module:
        if source == "embed_tokens":  # an LM head tied to the input embeddings
            head = nn.Linear(like.in_features, like.out_features, bias=False, device="meta")
            head.weight = self.embed_tokens.weight
            return head
        return self.get_submodule(self._part_path(source))

    def _find_equal(self, module: nn.Module, part: str, name: str) -> str | None:
        """An attached part (an owner, not itself shared) equal to ``module``, or the embeddings for a head."""
        if part == "lm_head" and isinstance(module, nn.Linear) and module.bias is None \
                and module.weight.shape == self.embed_tokens.weight.shape \
                and torch.equal(module.weight, self.embed_tokens.weight.to(module.weight.device)):
            return "embed_tokens"
        for other in self.config.expert_names:
            key = f"{other}.{part}"
            if other != name and key not in self.config.shared_parts and \
                    modules_equal(self.get_submodule(self._part_path(key)), module):
                return key
        return None

    def _attach(self, name: str, model: nn.Module | None, depth: int, expert_config, share: bool = True) -> None:
        from .._common import config_from_dict, config_to_dict

        expert_config = config_from_dict(expert_config)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if name in self.config.expert_names:
            raise ValueError(f"an expert named {name!r} is already attached; pop it first")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= len(self.backbone):
            raise ValueError(f"expert {name!r}: its CoE layer depth must be an int in [0, {len(self.backbone)}] (the "
                             f"backbone holds {len(self.backbone)} base layers), got {depth!r}")
        if expert_config.num_hidden_layers < depth:
            raise ValueError(f"expert {name!r} has {expert_config.num_hidden_layers} layers, fewer than its CoE layer "
                             f"depth {depth}")
        from_config = model is None
        if from_config:
            model = AutoModelForCausalLM.from_config(expert_config)
        decoder, head = decoder_parts(model, f"expert {name!r}")
        layers, norm = nn.ModuleList(decoder.layers[depth:]), decoder.norm
        parts = {"norm": norm, "lm_head": head}
        shared = dict(self.config.shared_parts)
        for part, module in parts.items():
            key = f"{name}.{part}"
            if from_config:
                source = self.config.shared_parts.get(key)  # as saved
            else:
                source = self._find_equal(module, part, name) if share else None
                shared.pop(key, None)
            if source is not None:
                parts[part] = self._shared_module(source, module)
                shared[key] = source
        # A tensor may appear once in the model (safetensors); copy parts the model already holds unshared.
        held = {id(p) for p in self.parameters()}
        if any(id(p) in held for p in layers.parameters()):
            layers = copy.deepcopy(layers)
        held |= {id(p) for p in layers.parameters()}
        for part, module in parts.items():
            if f"{name}.{part}" not in shared and any(id(p) in held for p in module.parameters()):
                parts[part] = copy.deepcopy(module)
            held |= {id(p) for p in parts[part].parameters()}
        branch = ExpertBranch(layers, parts["norm"], parts["lm_head"], model.config, depth)
        key = str(depth)
        if key not in self.coe_layers:
            self.coe_layers[key] = CoELayer()
        self.coe_layers[key].add_branch(name, branch)
        self.config.expert_names = list(self.config.expert_names) + [name]
        self.config.coe_layers = {**self.config.coe_layers, name: depth}
        self.config.expert_configs = {**self.config.expert_configs, name: config_to_dict(model.config)}
        self.config.shared_parts = shared
        self._update_ties()

    def _unshare(self, name: str, part: str) -> None:
        """Give expert ``name`` its own copy of ``part`` (and hand ownership on if others shared its)."""
        key = f"{name}.{part}"
        shared = dict(self.config.shared_parts)
        branch = self.branch(name)
        if key in shared:  # it uses another's module: take a copy
            del shared[key]
            setattr(branch, part, copy.deepcopy(getattr(branch, part)))
        sharers = [k for k, v in shared.items() if v == key]
        if sharers:  # others use its module: the first of them becomes the owner of that module
            owner = sharers[0]
            del shared[owner]
            for other in sharers[1:]:
                shared[other] = owner
            setattr(branch, part, copy.deepcopy(getattr(branch, part)))
        self.config.shared_parts = shared
        self._update_ties()

    def push_expert(self, name: str, model: nn.Module, coe_layer: int | None = None, verify_prefix: bool = True):
        """Attach ``model`` as expert ``name`` at CoE layer depth ``coe_layer`` (default: the only depth in use):
        its layers from that depth on, its norm and head. ``verify_prefix`` checks that its embeddings and
        lower layers equal the backbone's (CCoE trains experts with the shared prefix frozen). The other
        experts are untouched."""
        from ...hf.couple import check_same_architecture

        if coe_layer is None:
            depths = self.config.depths
            if len(depths) != 1:
                raise ValueError(f"pass coe_layer= (the model has CoE layers at depths {depths})")
            coe_layer = depths[0]
        base_config = self.config.text_config
        check_same_architecture(self._base_class, base_config, self.embed_tokens.weight.dtype, model, name, coe_layer)
        decoder, _ = decoder_parts(model, f"expert {name!r}")
        if verify_prefix:
            if not modules_equal(self.embed_tokens, decoder.embed_tokens):
                raise ValueError(f"expert {name!r} has embeddings that differ from the base's; the shared backbone "
                                 "would change its outputs (pass verify_prefix=False to couple anyway)")
            for index in range(min(coe_layer, len(self.backbone))):
                if not modules_equal(self.backbone[index], decoder.layers[index]):
                    raise ValueError(f"expert {name!r} layer {index} (below its CoE layer at depth {coe_layer}) differs "
                                     "from the base's (pass verify_prefix=False to couple anyway)")
        self._attach(name, model, coe_layer, model.config)

    def pop_expert(self, name: str) -> ExpertBranch:
        """Detach expert ``name``; the others are untouched. Returns its branch."""
        for part in ("norm", "lm_head"):
            self._unshare(name, part)
        branch = self.branch(name)
        key = str(self.config.coe_layers[name])
        self.coe_layers[key].remove_branch(name)
        if not len(self.coe_layers[key].branches):
            del self.coe_layers[key]
        self.config.expert_names = [n for n in self.config.expert_names if n != name]
        self.config.coe_layers = {k: v for k, v in self.config.coe_layers.items() if k != name}
        self.config.expert_configs = {k: v for k, v in self.config.expert_configs.items() if k != name}
        self._update_ties()
        return branch

    def memory_report(self) -> dict:
        """Parameter bytes of the coupled model vs keeping each expert as a full model (embeddings, the
        backbone layers below its CoE layer, and its own layers, norm and head)."""
        embed = unique_param_bytes(self.embed_tokens)
        separate = sum(embed + unique_param_bytes(*self.backbone[:self.expert_depth(n)]) + unique_param_bytes(self.branch(n))
                       for n in self.expert_names)
        coupled = unique_param_bytes(self)
        return {"experts": len(self.expert_names), "separate_bytes": separate, "coupled_bytes": coupled,
                "saved_bytes": separate - coupled,
                "saved_fraction": (separate - coupled) / separate if separate else 0.0}

    # ----- fine-tuning one expert -----
    def freeze_all_but_expert(self, name: str, train_norm_and_head: bool = True) -> list[nn.Parameter]:
        """Freeze every parameter except expert ``name``'s own layers (and, by default, its final norm and
        LM head). Returns the trainable parameters. The backbone, the router and the other experts stay
        frozen, so training this branch leaves every other expert's outputs unchanged (a norm or head it shared
        with other experts is first copied, so they keep theirs)."""
        if train_norm_and_head:  # a norm or head shared with other experts (or the embeddings) gets its own copy
            for part in ("norm", "lm_head"):
                self._unshare(name, part)
        branch = self.branch(name)
        for p in self.parameters():
            p.requires_grad_(False)
        modules = [branch.layers] + ([branch.norm, branch.lm_head] if train_norm_and_head else [])
        params = []
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(True)
                params.append(p)
        return params

    def train_expert(self, name: str, batches, lr: float = 1e-4, max_steps: int | None = None,
                     train_norm_and_head: bool = True, optimizer_cls=torch.optim.AdamW, **optimizer_kwargs):
        """Fine-tune expert ``name``'s branch alone on its domain data, everything else frozen.

        batches: dicts with input_ids [B, L], labels [B, L] (-100 ignored) and optionally attention_mask;
        every sequence is routed to ``name``. Returns the loss of each step; leaves the model in eval mode
        with ``requires_grad`` as :meth:`freeze_all_but_expert` set it."""
        params = self.freeze_all_but_expert(name, train_norm_and_head)
        self.train()
        losses = train_steps(self, batches, optimizer_cls(params, lr=lr, **optimizer_kwargs), max_steps,
                             expert=name, use_cache=False)
        self.eval()
        return losses

    # ----- helpers -----
    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return None  # one head per expert

    def _vocab_groups(self):
        # one backbone embedding; a head per expert (some tied to the embedding, some one module shared by experts)
        return [(self, [self.embed_tokens], [self.branch(name).lm_head for name in self.expert_names])]

    def _set_vocab_size(self, size: int) -> None:
        super()._set_vocab_size(size)  # text_config (the base, rebuilt as the backbone on load)
        # the experts are rebuilt on load from expert_configs; a branch's config is its expert model's
        self.config.expert_configs = {name: {**values, "vocab_size": size}
                                      for name, values in self.config.expert_configs.items()}
        for name in self.expert_names:
            self.branch(name).config.vocab_size = size

    def _stage(self, hidden, start: int, end: int, rows, attention_mask, position_ids, position_embeddings, cache,
               use_cache):
        if start == end:
            return hidden
        indices = list(range(start, end))
        masks = build_attention_masks(self.config.text_config, hidden, attention_mask, cache, position_ids, indices,
                                      self._backbone_types)
        return run_decoder_layers(self.backbone[start:end], indices, self._backbone_types, hidden, masks,
                                  position_embeddings, position_ids, cache, use_cache)

    def _first_stage(self, input_ids, attention_mask, position_ids, cache, use_cache):
        from transformers import DynamicCache

        hidden = self.embed_tokens(input_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        depth0 = self.config.depths[0]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        stage_cache = None if cache is None else cache.sub_cache(
            cache.stages, depth0, rows, lambda: DynamicCache(config=self.config.text_config))
        hidden = self._stage(hidden, 0, depth0, rows, attention_mask, position_ids, position_embeddings, stage_cache,
                             use_cache)
        return hidden, position_embeddings

    def prefix_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's output at the first CoE layer [B, L, H] (the routers' input), without cache."""
        if not self.expert_names:
            raise RuntimeError("the coupled model has no experts attached (push_expert first)")
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return self._first_stage(input_ids, attention_mask, position_ids, None, False)[0]

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list:
        """The expert(s) the router picks for each prompt (names; lists of names in multi-expert mode)."""
        routing = self._resolve(None, input_ids, attention_mask, self.prefix_hidden(input_ids, attention_mask))
        return self._routing_names(routing)

    def _routing_names(self, routing: Routing) -> list:
        names = self.expert_names
        if routing.single:
            return [names[a[0]] for a in routing.active]
        return [[names[e] for e in a] for a in routing.active]

    def _resolve(self, expert, input_ids, attention_mask, hidden) -> Routing:
        from ...hf.couple import ClassifierRouter, pooled_hidden

        names, batch_size = self.expert_names, input_ids.shape[0]
        if not names:
            raise RuntimeError("the coupled model has no experts attached")
        if expert is None:
            if self.router is None:
                raise ValueError("no router is set: pass expert= (a name, one per sequence, or a list of names per "
                                 "sequence) or set model.router")
            multi = int(self.config.multi_expert or 1)
            if multi > 1:
                if not isinstance(self.router, ClassifierRouter):
                    raise ValueError("multi_expert > 1 needs a ClassifierRouter (it scores every expert)")
                with torch.no_grad():
                    scores = self.router(pooled_hidden(hidden, attention_mask))
                top = scores.topk(min(multi, scores.shape[-1]), dim=-1).indices.tolist()
                expert = [[self.router.names[i] for i in row] for row in top]
            else:
                expert = self.router.choose(self, input_ids, attention_mask, hidden)
        if isinstance(expert, torch.Tensor):
            expert = expert.tolist()
        if isinstance(expert, (str, int)):
            expert = [expert] * batch_size
        expert = list(expert)
        if len(expert) != batch_size and expert and batch_size % len(expert) == 0:
            repeat = batch_size // len(expert)  # generate() expanded the batch (beams / num_return_sequences)
            expert = [e for e in expert for _ in range(repeat)]
        if len(expert) != batch_size:
            raise ValueError(f"expert gives {len(expert)} choices for a batch of {batch_size} sequences")

        def resolve_one(e):
            if isinstance(e, str):
                if e not in names:
                    raise ValueError(f"expert {e!r} is not attached; attached experts: {names}")
                return names.index(e)
            if isinstance(e, int) and not isinstance(e, bool) and 0 <= e < len(names):
                return e
            raise ValueError(f"expert must be a name in {names} or an id in [0, {len(names)}), got {e!r}")

        active = [[resolve_one(x) for x in (e if isinstance(e, (list, tuple)) else [e])] for e in expert]
        if any(not a for a in active):
            raise ValueError("every sequence needs at least one expert")
        routing = Routing(active, input_ids.device)
        if not routing.single and not isinstance(self.router, ClassifierRouter):
            raise ValueError("a sequence with several active experts is routed per step by a ClassifierRouter "
                             "(set model.router to one); without it give one expert per sequence")
        return routing

    def _step_choice(self, routing: Routing, hidden, attention_mask, cache) -> torch.Tensor:
        """[B, L] expert id per position (multi-expert rule: router argmax among the sequence's active
        experts on the running mean backbone state)."""
        batch, length, _ = hidden.shape
        if attention_mask is None:
            mask = torch.ones(batch, length, device=hidden.device)
        else:
            mask = attention_mask[:, -length:].to(hidden.device).float()
        sums = torch.cumsum(hidden.float() * mask[..., None], dim=1)
        counts = torch.cumsum(mask, dim=1)
        if cache is not None and cache.feature_sum is not None:
            sums = sums + cache.feature_sum[:, None]
            counts = counts + cache.feature_count[:, None]
        if cache is not None:
            cache.feature_sum, cache.feature_count = sums[:, -1].detach(), counts[:, -1].detach()
        features = sums / counts.clamp_min(1.0)[..., None]
        router_names = self.router.names
        with torch.no_grad():
            scores = self.router(features.reshape(-1, features.shape[-1])).float().reshape(batch, length, -1)
        names = self.expert_names
        allowed = torch.full((batch, len(router_names)), float("-inf"), device=hidden.device)
        for b, active in enumerate(routing.active):
            for e in active:
                if names[e] in router_names:
                    allowed[b, router_names.index(names[e])] = 0.0
        if torch.isinf(allowed).all(-1).any():
            raise ValueError("a sequence's active experts are not among the router's names")
        local = (scores + allowed[:, None]).argmax(-1)
        to_global = torch.tensor([names.index(n) if n in names else -1 for n in router_names], device=hidden.device)
        return to_global[local]

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: CcoeCache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, expert=None,
                **kwargs) -> CcoeCausalLMOutput:
        from transformers import DynamicCache

        cache = forward_cache("CcoeForCausalLM", cache, kwargs)
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids [B, L] are required")
        if not self.expert_names:
            raise RuntimeError("the coupled model has no experts attached (push_expert first)")
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training and labels is None
        if cache is not None and not isinstance(cache, CcoeCache):
            raise TypeError(f"cache must be a CcoeCache (made by the model), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = CcoeCache(self.expert_names)
        if cache is not None and cache.names != self.expert_names:
            raise ValueError("the experts changed (push/pop) since this cache was made; start a new one")
        batch, length = input_ids.shape
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + length, device=input_ids.device)[None]

        hidden0, position_embeddings = self._first_stage(input_ids, attention_mask, position_ids, cache, use_cache)
        if cache is not None and cache.routing is not None:
            routing = cache.routing  # fixed at the prompt
        else:
            routing = self._resolve(expert, input_ids, attention_mask, hidden0)
            self.last_routing = self._routing_names(routing)
            if cache is not None:
                cache.routing = routing
        step_choice = None if routing.single else self._step_choice(routing, hidden0, attention_mask, cache)

        depth_of = torch.tensor([self.config.coe_layers[n] for n in self.expert_names], device=input_ids.device)
        pair_depth = depth_of[routing.pair_experts]
        cur_rows = torch.arange(batch, device=input_ids.device)
        cur_hidden, previous = hidden0, self.config.depths[0]
        outputs = []
        for depth in self.config.depths:
            if not bool((pair_depth >= depth).any()):
                break  # every request left at a shallower CoE layer: no deeper backbone stage to run
            if depth != previous:
                needed = torch.unique(routing.pair_rows[pair_depth >= depth])
                cur_hidden = cur_hidden.index_select(0, torch.searchsorted(cur_rows, needed))
                cur_rows = needed
                stage_cache = None if cache is None else cache.sub_cache(
                    cache.stages, depth, needed, lambda: DynamicCache(config=self.config.text_config))
                cur_hidden = self._stage(cur_hidden, previous, depth, needed, _select(attention_mask, needed),
                                         _select(position_ids, needed),
                                         tuple(_select(t, needed) for t in position_embeddings), stage_cache,
                                         use_cache)
                previous = depth
            exiting = torch.nonzero(pair_depth == depth).flatten()
            if not exiting.numel():
                continue
            rows = routing.pair_rows[exiting]
            layer = self.coe_layers[str(depth)]
            local_names = layer.names
            experts = routing.pair_experts[exiting]
            local_ids = torch.tensor([local_names.index(self.expert_names[e]) for e in experts.tolist()],
                                     device=input_ids.device)
            caches = None
            if cache is not None:
                caches = {}
                for name in local_names:
                    global_id = self.expert_names.index(name)
                    branch_rows = routing.pair_rows[routing.pair_experts == global_id]
                    if branch_rows.numel():
                        caches[name] = cache.sub_cache(cache.branches, name, branch_rows,
                                                       layer.branches[name].new_cache)
            logits = layer(cur_hidden.index_select(0, torch.searchsorted(cur_rows, rows)), local_ids,
                           _select(attention_mask, rows), _select(position_ids, rows),
                           tuple(_select(t, rows) for t in position_embeddings), caches, use_cache)
            outputs.append((exiting, logits))
        order = torch.cat([idx for idx, _ in outputs])
        pair_logits = torch.cat([lg for _, lg in outputs]).index_select(0, torch.argsort(order))
        if cache is not None:
            cache.seen_tokens += length

        if routing.single:
            logits = pair_logits  # pairs are the sequences, in batch order
        else:
            pair_index = torch.full((batch, len(self.expert_names)), -1, dtype=torch.long, device=input_ids.device)
            pair_index[routing.pair_rows, routing.pair_experts] = torch.arange(routing.pair_rows.numel(),
                                                                               device=input_ids.device)
            chosen = pair_index.gather(1, step_choice)
            logits = pair_logits[chosen, torch.arange(length, device=input_ids.device)[None].expand(batch, length)]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        names = self.expert_names
        if routing.single:
            expert_ids = routing.pair_experts
            expert_names = [names[i] for i in expert_ids.tolist()]
        else:
            expert_ids, expert_names = None, [[names[e] for e in a] for a in routing.active]
        return CcoeCausalLMOutput(loss=loss, logits=logits, expert_ids=expert_ids, expert_names=expert_names,
                                  step_expert_ids=step_choice, **{CACHE_FIELD: cache if use_cache else None})


__all__ = ["CcoeForCausalLM", "CcoeCache", "CcoeCausalLMOutput", "Routing"]
