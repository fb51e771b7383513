"""jaxinfer: a JAX/Pallas research framework for LLM inference."""

from jaxinfer.checkpoint import CheckpointError
from jaxinfer.config import ConfigError, ModelConfig
from jaxinfer.llm import LLM
from jaxinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxinfer.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics",
           "ModelConfig", "CheckpointError", "ConfigError"]
__version__ = "0.1.0"
