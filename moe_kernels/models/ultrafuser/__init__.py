from .configuration_ultrafuser import UltraFuserConfig
from .modeling_ultrafuser import UltraFuserCache, UltraFuserForCausalLM, check_fusable

__all__ = ["UltraFuserConfig", "UltraFuserForCausalLM", "UltraFuserCache", "check_fusable"]
