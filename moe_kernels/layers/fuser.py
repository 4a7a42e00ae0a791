"""UltraFuser: token-level gated fusion of specialist causal LMs.

All specialists run on the same tokens. Per token, a shared gate MLP (H -> gate_hidden -> ReLU -> 1)
scores each specialist's last hidden state h_j (after its final norm); w = softmax over the
specialists; the fused logits are o = sum_j w_j * o_j with o_j = head_j(h_j).

Training the fused model with cross-entropy naively keeps all N [T, V] logit tensors (and their
gradients) alive. :func:`fused_gated_cross_entropy` computes the same loss and gradients chunk by
chunk over tokens, so only two chunk-sized [C, V] blocks exist at once (the running blend and one
specialist's logits); its gradients go into the
gate weights w, every specialist's hidden states and every head (weight and bias).

Also here: the two-stage training helpers (stage 1: gate only; stage 2: everything) and
:class:`DomainBalancedBatchSampler`, which gives every batch an equal share of each domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..hf.compat import cache_kwargs
from .coe import decode_with_cache, generation_defaults

# fp32 [chunk, V] scratch the fused loss allows itself when no chunk size is given (the blend, which becomes
# its gradient, and one specialist's logits): 2**24 elements = 64 MiB in all.
_AUTO_CHUNK_ELEMENTS = 2 ** 24
REDUCTIONS = ("mean", "sum")


def _auto_chunk_size(num_tokens: int, vocab_size: int) -> int:
    return max(1, min(num_tokens, _AUTO_CHUNK_ELEMENTS // (2 * vocab_size) or 1))


class _FusedGatedCrossEntropy(torch.autograd.Function):
    """Loss and all gradients computed together in forward, chunk by chunk; backward scales them.

    Inputs: gate_weights [T, N], labels [T], then N hidden tensors [T, H_j], N head weights [V, H_j] and
    (when has_bias) N head biases [V].
    """

    @staticmethod
    def forward(ctx, gate_weights, labels, num_specialists, has_bias, ignore_index, reduction, chunk_size, *tensors):
        n = num_specialists
        hiddens, heads = tensors[:n], tensors[n:2 * n]
        biases = tensors[2 * n:3 * n] if has_bias else (None,) * n
        offset = 7  # position of the first tensor in forward's inputs (for needs_input_grad)
        need_w = ctx.needs_input_grad[0]
        need_h = [ctx.needs_input_grad[offset + j] for j in range(n)]
        need_head = [ctx.needs_input_grad[offset + n + j] for j in range(n)]
        need_b = [has_bias and ctx.needs_input_grad[offset + 2 * n + j] for j in range(n)]
        need_any = need_w or any(need_h) or any(need_head) or any(need_b)

        num_tokens, vocab = labels.shape[0], heads[0].shape[0]
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
        count = valid.sum()
        denominator = count.clamp_min(1).float() if reduction == "mean" else torch.ones((), device=labels.device)
        chunk = chunk_size or _auto_chunk_size(num_tokens, vocab)

        total = torch.zeros((), dtype=torch.float32, device=labels.device)
        grad_w = torch.zeros(num_tokens, n, dtype=torch.float32, device=labels.device) if need_w else None
        grad_h = [torch.empty_like(hiddens[j]) if need_h[j] else None for j in range(n)]
        grad_head = [torch.zeros(heads[j].shape, dtype=torch.float32, device=heads[j].device) if need_head[j] else None
                     for j in range(n)]
        grad_b = [torch.zeros(vocab, dtype=torch.float32, device=labels.device) if need_b[j] else None
                  for j in range(n)]

        for start in range(0, num_tokens, chunk):
            end = min(num_tokens, start + chunk)
            weights = gate_weights[start:end].float()
            blended = None
            for j in range(n):
                logits_j = F.linear(hiddens[j][start:end], heads[j], biases[j]).float()
                if blended is None:
                    blended = logits_j.mul_(weights[:, :1])
                else:
                    blended.addcmul_(logits_j, weights[:, j:j + 1])
                del logits_j
            lse = torch.logsumexp(blended, dim=-1)
            target = blended.gather(1, safe_labels[start:end, None]).squeeze(1)
            row_valid = valid[start:end].float()
            total = total + ((lse - target) * row_valid).sum()
            if not need_any:
                continue
            # G = dL/d(blended) = (softmax - onehot(label)) / denominator, zero on ignored rows; computed in
            # the blend's buffer. Then per specialist, with w_j a per-row scalar and GW_j = G @ W_j [C, H]
            # (so no [C, V] temporaries and no specialist's logits kept):
            # dL/dw_j = rowdot(GW_j, h_j) + G b_j, dL/dh_j = w_j * GW_j, dL/dW_j = G^T (w_j * h_j), dL/db_j = G^T w_j.
            grad_blended = blended.sub_(lse[:, None]).exp_()
            grad_blended.scatter_add_(1, safe_labels[start:end, None],
                                      -torch.ones((end - start, 1), dtype=torch.float32, device=labels.device))
            grad_blended.mul_((row_valid / denominator)[:, None])
            for j in range(n):
                weight_j = weights[:, j:j + 1]
                if need_w or need_h[j]:
                    grad_times_head = (grad_blended.to(heads[j].dtype) @ heads[j]).float()
                if need_w:
                    grad_w[start:end, j] = (grad_times_head * hiddens[j][start:end].float()).sum(-1)
                    if biases[j] is not None:
                        grad_w[start:end, j] += grad_blended @ biases[j].float()
                if need_h[j]:
                    grad_h[j][start:end] = (grad_times_head * weight_j).to(hiddens[j].dtype)
                if need_head[j]:
                    grad_head[j].addmm_(grad_blended.t(), hiddens[j][start:end].float() * weight_j)
                if need_b[j]:
                    grad_b[j].addmv_(grad_blended.t(), weight_j.view(-1))

        ctx.grads = (grad_w, grad_h, grad_head, grad_b)
        ctx.dtypes = (gate_weights.dtype, [h.dtype for h in hiddens], [w.dtype for w in heads],
                      [b.dtype if b is not None else None for b in biases])
        ctx.has_bias = has_bias
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_gated_cross_entropy: backward ran twice through one loss (retain_graph); "
                               "its gradients are computed in forward and handed over once. Recompute the loss.")
        grad_w, grad_h, grad_head, grad_b = ctx.grads
        ctx.grads = None  # hand the buffers over (no copies kept alive)
        w_dtype, h_dtypes, head_dtypes, b_dtypes = ctx.dtypes
        unit = bool(grad_loss == 1)

        def scaled(g, dtype):
            if g is None:
                return None
            return (g if unit else g.mul_(grad_loss)).to(dtype)

        out = [scaled(grad_w, w_dtype), None, None, None, None, None, None]
        out += [scaled(g, d) for g, d in zip(grad_h, h_dtypes)]
        out += [scaled(g, d) for g, d in zip(grad_head, head_dtypes)]
        if ctx.has_bias:
            out += [scaled(g, d) for g, d in zip(grad_b, b_dtypes)]
        return tuple(out)


def _check_gated_ce_args(hidden_states, head_weights, gate_weights, labels, head_biases, reduction):
    if not isinstance(hidden_states, (list, tuple)) or not hidden_states:
        raise ValueError("hidden_states must be a non-empty list of [T, H] tensors, one per specialist")
    n = len(hidden_states)
    if not isinstance(head_weights, (list, tuple)) or len(head_weights) != n:
        raise ValueError(f"head_weights must be a list of {n} [V, H] tensors (one per hidden_states entry)")
    if head_biases is not None and (not isinstance(head_biases, (list, tuple)) or len(head_biases) != n):
        raise ValueError(f"head_biases must be None or a list of {n} [V] tensors")
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be a 1-D int64/int32 tensor [T], got shape {tuple(labels.shape)} "
                         f"dtype {labels.dtype}")
    num_tokens = labels.shape[0]
    if gate_weights.shape != (num_tokens, n):
        raise ValueError(f"gate_weights must have shape [T, N] = {(num_tokens, n)}, got {tuple(gate_weights.shape)}")
    vocab = head_weights[0].shape[0]
    for j, (h, w) in enumerate(zip(hidden_states, head_weights)):
        if h.dim() != 2 or h.shape[0] != num_tokens:
            raise ValueError(f"hidden_states[{j}] must have shape [T={num_tokens}, H], got {tuple(h.shape)}")
        if w.dim() != 2 or w.shape[1] != h.shape[1]:
            raise ValueError(f"head_weights[{j}] must have shape [V, H={h.shape[1]}], got {tuple(w.shape)}")
        if w.shape[0] != vocab:
            raise ValueError(f"head_weights[{j}] has vocabulary size {w.shape[0]} but head_weights[0] has {vocab}; "
                             "the specialists must share one vocabulary")
        if head_biases is not None and head_biases[j] is not None and head_biases[j].shape != (vocab,):
            raise ValueError(f"head_biases[{j}] must have shape [{vocab}], got {tuple(head_biases[j].shape)}")
    if head_biases is not None and any(b is None for b in head_biases) and not all(b is None for b in head_biases):
        raise ValueError("head_biases must be all tensors or all None")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")


def fused_gated_cross_entropy(hidden_states: Sequence[torch.Tensor], head_weights: Sequence[torch.Tensor],
                              gate_weights: torch.Tensor, labels: torch.Tensor,
                              head_biases: Sequence[torch.Tensor] | None = None, ignore_index: int = -100,
                              reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the gated blend sum_j w_j * (h_j @ W_j^T + b_j), without materialising the N
    full [T, V] logit tensors.

    hidden_states: N tensors [T, H_j]; head_weights: N tensors [V, H_j]; gate_weights [T, N] (any float
    dtype, used in fp32); labels [T] int (``ignore_index`` rows contribute nothing); head_biases: None
    or N tensors [V]. Works through the tokens in chunks of ``chunk_size`` (default: sized so the
    fp32 scratch stays near 64 MiB whatever N and T); softmax/log-sum-exp in fp32. Returns a float32
    scalar equal to ``naive_gated_cross_entropy`` (mean over non-ignored tokens, or sum), with
    gradients for the gate weights, the hidden states, the head weights and biases. If every label
    is ignored, the mean is 0 (not NaN). The gradients are computed in forward (only for inputs that
    require them) and handed over in backward: not twice differentiable, and backward runs once per loss.
    """
    if head_biases is not None and all(b is None for b in head_biases):
        head_biases = None
    _check_gated_ce_args(hidden_states, head_weights, gate_weights, labels, head_biases, reduction)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    tensors = list(hidden_states) + list(head_weights) + (list(head_biases) if head_biases is not None else [])
    return _FusedGatedCrossEntropy.apply(gate_weights, labels, len(hidden_states), head_biases is not None,
                                         ignore_index, reduction, chunk_size, *tensors)


def naive_gated_cross_entropy(hidden_states: Sequence[torch.Tensor], head_weights: Sequence[torch.Tensor],
                              gate_weights: torch.Tensor, labels: torch.Tensor,
                              head_biases: Sequence[torch.Tensor] | None = None, ignore_index: int = -100,
                              reduction: str = "mean") -> torch.Tensor:
    """The plain form of :func:`fused_gated_cross_entropy` (all N [T, V] logits at once): the oracle."""
    _check_gated_ce_args(hidden_states, head_weights, gate_weights, labels, head_biases, reduction)
    biases = head_biases if head_biases is not None else [None] * len(hidden_states)
    blended = sum(gate_weights[:, j:j + 1].float() * F.linear(h, w, b).float()
                  for j, (h, w, b) in enumerate(zip(hidden_states, head_weights, biases)))
    return F.cross_entropy(blended, labels.long(), ignore_index=ignore_index, reduction=reduction)


# ----------------------------------------------------------------------------------------------------
# The fused model


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """loss (scalar, when labels were given); logits [B, L, V] float32 (None when only the loss was
    asked for); cache (:class:`FuserCache`, also readable as ``past_key_values``); gate_weights [B, L, N] float32.

    The field is ``cache``, not ``past_key_values``: transformers >= 5.24 rewrites ``past_key_values=`` into
    ``cache=`` in every ModelOutput's constructor (moe_kernels.hf.compat)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    gate_weights: torch.Tensor | None = None

    @property
    def past_key_values(self):
        return self.cache


class FuserCache:
    """One KV cache per specialist."""

    def __init__(self, caches: list):
        self.caches = caches

    def get_seq_length(self) -> int:
        return self.caches[0].get_seq_length()


def _specialist_parts(model: nn.Module, index: int):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or not isinstance(head, nn.Linear):
        raise TypeError(f"specialist {index} must be a Hugging Face causal LM with a decoder and a linear LM head, "
                        f"got {type(model).__name__}")
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"specialist {index} ({type(model).__name__}) transforms its logits ({attr}); "
                             "TokenFuser supports plain linear heads only")
    return decoder, head


class TokenFuser(nn.Module):
    """Specialist causal LMs fused token by token through a shared gate, called like a causal LM.

    specialists: causal LMs sharing one vocabulary and one hidden size (depth and family may differ);
    gate_hidden: width of the gate MLP (H -> gate_hidden -> ReLU -> 1); names: optional names.

    ``forward(input_ids [B, L], attention_mask=None, position_ids=None, past_key_values=None,
    use_cache=False, labels=None, force_specialist=None, return_logits=None, loss_impl="fused",
    chunk_size=None)``. ``force_specialist`` (index or name) sets the gate weights one-hot.
    With ``labels`` the loss is the blended next-token cross-entropy (labels shifted inside, -100
    ignored), computed by :func:`fused_gated_cross_entropy` ("fused") or the naive form ("naive");
    logits are then only returned if ``return_logits=True``.
    """

    def __init__(self, specialists: Sequence[nn.Module], gate_hidden: int = 512, names: Sequence[str] | None = None):
        super().__init__()
        specialists = list(specialists)
        if not specialists:
            raise ValueError("specialists must list at least one model")
        if isinstance(gate_hidden, bool) or not isinstance(gate_hidden, int) or gate_hidden < 1:
            raise ValueError(f"gate_hidden must be a positive int, got {gate_hidden!r}")
        heads = [_specialist_parts(m, j)[1] for j, m in enumerate(specialists)]
        vocab, hidden = heads[0].out_features, heads[0].in_features
        for j, head in enumerate(heads[1:], start=1):
            if head.out_features != vocab:
                raise ValueError(f"specialist {j} has vocabulary size {head.out_features} but specialist 0 has "
                                 f"{vocab}; fusion needs one shared vocabulary (different tokenizers are not "
                                 "supported)")
            if head.in_features != hidden:
                raise ValueError(f"specialist {j} has hidden size {head.in_features} but specialist 0 has {hidden}; "
                                 "the shared gate needs one hidden size")
        for j, model in enumerate(specialists):
            config_vocab = getattr(model.config, "vocab_size", vocab)
            if config_vocab != vocab:
                raise ValueError(f"specialist {j} has config.vocab_size {config_vocab} but its head has {vocab} rows")
        if names is None:
            names = [f"specialist_{j}" for j in range(len(specialists))]
        names = list(names)
        if len(names) != len(specialists) or len(set(names)) != len(names):
            raise ValueError(f"names must be {len(specialists)} distinct names, got {names}")
        self.names = names
        self.specialists = nn.ModuleList(specialists)
        reference = heads[0].weight
        self.gate = nn.Sequential(nn.Linear(hidden, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, 1)).to(
            device=reference.device, dtype=reference.dtype)

    @property
    def num_specialists(self) -> int:
        return len(self.specialists)

    @property
    def device(self) -> torch.device:
        return self.gate[0].weight.device

    def _heads(self) -> list[nn.Linear]:
        return [m.get_output_embeddings() for m in self.specialists]

    def specialist_hidden_states(self, input_ids, attention_mask=None, position_ids=None,
                                 cache: FuserCache | None = None, use_cache: bool = False) -> list[torch.Tensor]:
        """Each specialist's last hidden state (after its final norm) [B, L, H]."""
        outputs = []
        for j, model in enumerate(self.specialists):
            out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=use_cache, **cache_kwargs(None if cache is None else cache.caches[j]))
            outputs.append(out.last_hidden_state)
        return outputs

    def gate_weights(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Softmax over specialists of the shared gate's score of each hidden state -> [B, L, N] float32."""
        scores = torch.stack([self.gate(h).squeeze(-1) for h in hidden_states], dim=-1)
        return torch.softmax(scores.float(), dim=-1)

    def _forced_weights(self, force_specialist, like: torch.Tensor) -> torch.Tensor:
        index = self.names.index(force_specialist) if isinstance(force_specialist, str) and \
            force_specialist in self.names else force_specialist
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_specialists:
            raise ValueError(f"force_specialist must be a name in {self.names} or an index in "
                             f"[0, {self.num_specialists}), got {force_specialist!r}")
        return F.one_hot(torch.full(like.shape[:-1], index, device=like.device), self.num_specialists).float()

    def blend_logits(self, hidden_states: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """sum_j w_j * head_j(h_j) -> [B, L, V] float32, one specialist's logits at a time."""
        blended = None
        for j, (head, h) in enumerate(zip(self._heads(), hidden_states)):
            term = weights[..., j:j + 1] * head(h).float()
            blended = term if blended is None else blended + term
        return blended

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: FuserCache | None = None,
                use_cache: bool = False, labels: torch.Tensor | None = None, force_specialist=None,
                return_logits: bool | None = None, loss_impl: str = "fused",
                chunk_size: int | None = None) -> FusedCausalLMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        if loss_impl not in ("fused", "naive"):
            raise ValueError(f"loss_impl must be 'fused' or 'naive', got {loss_impl!r}")
        cache = past_key_values
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = FuserCache([DynamicCache(config=m.config) for m in self.specialists])
        hidden = self.specialist_hidden_states(input_ids, attention_mask, position_ids, cache, use_cache)
        weights = self.gate_weights(hidden)
        if force_specialist is not None:
            weights = self._forced_weights(force_specialist, weights)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            heads = self._heads()
            shifted = [h[:, :-1].flatten(0, 1) for h in hidden]
            loss_fn = fused_gated_cross_entropy if loss_impl == "fused" else naive_gated_cross_entropy
            extra = {"chunk_size": chunk_size} if loss_impl == "fused" else {}
            biases = [hd.bias for hd in heads]
            loss = loss_fn(shifted, [hd.weight for hd in heads], weights[:, :-1].flatten(0, 1),
                           labels[:, 1:].flatten(), head_biases=None if biases[0] is None else biases, **extra)
        if return_logits is None:
            return_logits = labels is None
        logits = self.blend_logits(hidden, weights) if return_logits else None
        return FusedCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                                   gate_weights=weights)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, force_specialist=None, eos_token_id=None, pad_token_id=None,
                 **decode_kwargs) -> torch.Tensor:
        """Blended decoding, one token per step, one KV cache per specialist (greedy by default; see
        :func:`moe_kernels.layers.coe.decode_with_cache` for sampling). eos/pad default to the first
        specialist's generation config. Returns [B, L + n]."""
        eos_token_id, pad_token_id = generation_defaults(self.specialists[0], eos_token_id, pad_token_id)
        decode_kwargs.update(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if force_specialist is not None:
            def step(*args, **kwargs):
                return self(*args, force_specialist=force_specialist, **kwargs)
        else:
            step = self
        return decode_with_cache(step, input_ids, attention_mask, max_new_tokens=max_new_tokens, **decode_kwargs)[0]


# ----------------------------------------------------------------------------------------------------
# Training helpers


def set_training_stage(fuser: TokenFuser, stage: int) -> list[nn.Parameter]:
    """Stage 1: only the gate trains (specialists frozen); stage 2: everything trains.
    Sets ``requires_grad`` accordingly and returns the parameters to optimise."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (gate only) or 2 (full), got {stage!r}")
    for p in fuser.specialists.parameters():
        p.requires_grad_(stage == 2)
    for p in fuser.gate.parameters():
        p.requires_grad_(True)
    return [p for p in fuser.parameters() if p.requires_grad]


def train_stage(fuser: TokenFuser, batches: Iterable[dict], stage: int, lr: float = 1e-3,
                max_steps: int | None = None, optimizer_cls=torch.optim.AdamW, **optimizer_kwargs) -> list[float]:
    """Run one UltraFuser training stage: ``set_training_stage`` then AdamW on the fused loss.

    batches: dicts with input_ids [B, L], labels [B, L] and optionally attention_mask. Returns the loss
    of each step. Stage 1 is cheap: with the specialists frozen, the fused loss computes only the
    gradient into the gate weights.
    """
    params = set_training_stage(fuser, stage)
    optimizer = optimizer_cls(params, lr=lr, **optimizer_kwargs)
    fuser.train()
    losses = []
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        out = fuser(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses


class DomainBalancedBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices with an equal share of every domain (UltraFuser's balanced sampler).

    domains: the domain label of each example (any hashable); batch_size: a multiple of the number of
    domains, each batch holds batch_size / D examples of each domain, shuffled. Each domain's examples
    are drawn without replacement in a fresh random order per pass; a smaller domain starts a new pass
    when it runs out. num_batches defaults to what one pass over the largest domain needs.
    Use as ``DataLoader(dataset, batch_sampler=sampler)``; :meth:`set_epoch` changes the order.
    """

    def __init__(self, domains: Sequence, batch_size: int, num_batches: int | None = None, seed: int = 0):
        domains = list(domains)
        if not domains:
            raise ValueError("domains must list the domain of at least one example")
        self.groups: dict = {}
        for index, domain in enumerate(domains):
            self.groups.setdefault(domain, []).append(index)
        num_domains = len(self.groups)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 \
                or batch_size % num_domains:
            raise ValueError(f"batch_size must be a positive multiple of the number of domains ({num_domains}: "
                             f"{list(self.groups)}), got {batch_size!r}")
        self.per_domain = batch_size // num_domains
        if num_batches is None:
            num_batches = max(math.ceil(len(g) / self.per_domain) for g in self.groups.values())
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
            raise ValueError(f"num_batches must be a non-negative int, got {num_batches!r}")
        self.batch_size, self.num_batches, self.seed, self.epoch = batch_size, num_batches, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

        def stream(indices):
            while True:
                for i in torch.randperm(len(indices), generator=generator).tolist():
                    yield indices[i]

        streams = [stream(g) for g in self.groups.values()]
        for _ in range(self.num_batches):
            batch = [next(s) for s in streams for _ in range(self.per_domain)]
            yield [batch[i] for i in torch.randperm(len(batch), generator=generator).tolist()]
