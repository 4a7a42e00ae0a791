from .configuration_ultrafuser import UltraFuserConfig
from .fuser import FusedCausalLMOutput, TokenFuser
from .modeling_ultrafuser import UltraFuserCache, UltraFuserForCausalLM, check_fusable
from .training import DomainBalancedBatchSampler, set_training_stage, train_stage

__all__ = ["UltraFuserConfig", "UltraFuserForCausalLM", "UltraFuserCache", "check_fusable", "TokenFuser",
           "FusedCausalLMOutput", "DomainBalancedBatchSampler", "set_training_stage", "train_stage"]
