"""jaxinfer: a JAX/Pallas research framework for LLM inference."""

from jaxinfer.beam import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from jaxinfer.checkpoint import CheckpointError
from jaxinfer.config import ConfigError, ModelConfig
from jaxinfer.jit_cache import disable_compilation_cache, enable_compilation_cache
from jaxinfer.llm import LLM
from jaxinfer.lora import LoRARequest
from jaxinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxinfer.sampling import SamplingParams
from jaxinfer.structured import StructuredOutputsParams

__all__ = ["LLM", "LoRARequest", "SamplingParams", "StructuredOutputsParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "RequestOutput",
           "CompletionOutput", "Logprob", "RequestMetrics", "ModelConfig", "CheckpointError", "ConfigError",
           "enable_compilation_cache", "disable_compilation_cache"]
__version__ = "0.1.0"
