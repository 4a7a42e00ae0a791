from .branch import ExpertBranch
from .configuration_ccoe import CcoeConfig
from .modeling_ccoe import CcoeCache, CcoeCausalLMOutput, CcoeForCausalLM

__all__ = ["CcoeConfig", "CcoeForCausalLM", "CcoeCache", "CcoeCausalLMOutput", "ExpertBranch"]
