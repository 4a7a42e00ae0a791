"""Configuration of an UltraFuser model (:class:`UltraFuserForCausalLM`)."""

from __future__ import annotations

from transformers import PreTrainedConfig

from .._common import config_from_dict, config_to_dict


class UltraFuserConfig(PreTrainedConfig):
    """Specialist causal LMs (any of Llama/Mistral/Qwen2/Qwen3..., one shared vocabulary and hidden size)
    fused token by token through a shared gate.

    specialists: [config dict of each specialist] (its ``to_dict()``, ``model_type`` included);
    specialist_names: their names, in order; gate_hidden: width of the gate MLP (H -> gate_hidden -> ReLU ->
    1). vocab_size, hidden_size and the special token ids are the first specialist's (generation reads them).
    """

    model_type = "moe_kernels_ultrafuser"

    specialists: list | None = None
    specialist_names: list | None = None
    gate_hidden: int = 512
    vocab_size: int | None = None
    hidden_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        self.specialists = [config_to_dict(c) for c in (self.specialists or [])]
        if self.specialist_names is None:
            self.specialist_names = [f"specialist_{j}" for j in range(len(self.specialists))]
        if len(self.specialist_names) != len(self.specialists):
            raise ValueError(f"specialist_names has {len(self.specialist_names)} names for "
                             f"{len(self.specialists)} specialists")
        if self.specialists:
            first = self.specialists[0]
            for key in ("vocab_size", "hidden_size", "bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(self, key) is None:
                    setattr(self, key, first.get(key))
        super().__post_init__(**kwargs)

    def specialist_configs(self) -> list[PreTrainedConfig]:
        """The specialists' transformers configs."""
        return [config_from_dict(c) for c in self.specialists]


__all__ = ["UltraFuserConfig"]
