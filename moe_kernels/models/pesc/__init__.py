from .configuration_pesc import PescConfig
from .modeling_pesc import PescForCausalLM, pesc_load_balancing_loss

__all__ = ["PescConfig", "PescForCausalLM", "pesc_load_balancing_loss"]
