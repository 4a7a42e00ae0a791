from .configuration_self_moe import SelfMoEConfig
from .modeling_self_moe import SelfMoEForCausalLM

__all__ = ["SelfMoEConfig", "SelfMoEForCausalLM"]
