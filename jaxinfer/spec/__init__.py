"""Speculative decoding as a jit-compiled loop (issue 7).

- verify.py: the lossless acceptance rule (Leviathan et al.; Chen et al.), greedy and sampled.
- drafters.py: draft model, layer skip (self-speculative), n-gram lookup, EAGLE, Medusa.
- heads.py: EAGLE / Medusa head params, forward, orbax save / load.
- loop.py: spec_prefill / spec_decode (lax.while_loop) and the host-side SpecDecoder.
- config.py: SpeculativeConfig (vLLM's speculative_config keys) and build_drafter.
- train_heads.py: optax training of EAGLE / Medusa heads on the target's features.
"""

from jaxinfer.spec.config import METHODS, SpeculativeConfig, build_drafter
from jaxinfer.spec.loop import SpecDecoder, SpecStats, SpecStatics, spec_decode, spec_prefill

__all__ = ["METHODS", "SpeculativeConfig", "build_drafter", "SpecDecoder", "SpecStats", "SpecStatics",
           "spec_decode", "spec_prefill"]
