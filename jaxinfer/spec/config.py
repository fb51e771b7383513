"""SpeculativeConfig: vLLM-style `speculative_config` dicts, validated, and the drafter they build.

    {"method": "draft_model", "model": "stdlib-draft", "num_speculative_tokens": 4}
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
                                        # optional "prompt_lookup_scale": n matched tokens propose
                                        # min(k, scale * n), each round verifies only that wide
                                        # any method: optional "disable_by_batch_size" (engine)
    {"method": "ngram_draft_model", "model": "stdlib-draft", "num_speculative_tokens": 8}
                                        # prompt lookup, else the draft model; optional lookup keys
    {"method": "layer_skip", "num_speculative_tokens": 3}               # optional "num_layers"
    {"method": "eagle", "num_speculative_tokens": 4}                    # optional "model": head dir
    {"method": "medusa", "num_speculative_tokens": 3}                   # likewise
                                        # both: optional "draft_vocab_size": draft among the N most
                                        # frequent tokens of the head's training data (heads.py)

Unknown methods or keys, k < 1, a draft model with another vocabulary, or a head trained
for another target raise ValueError naming the value.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.sampling import is_int
from jaxinfer.spec.heads import load_token_counts

METHODS = ("draft_model", "ngram", "ngram_draft_model", "layer_skip", "eagle", "medusa")
# Optional keys per method, beside the ones every method takes (disable_by_batch_size: engine).
_KEYS = {
    "draft_model": ("model",),
    "ngram": ("prompt_lookup_max", "prompt_lookup_min", "prompt_lookup_scale"),
    "ngram_draft_model": ("model", "prompt_lookup_max", "prompt_lookup_min"),
    "layer_skip": ("num_layers",),
    "eagle": ("model", "draft_vocab_size"),
    "medusa": ("model", "draft_vocab_size"),
}
_COMMON_KEYS = ("disable_by_batch_size",)
HEADS_DIR = Path(__file__).resolve().parents[1] / "assets" / "models" / "stdlib-target-heads"


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None  # draft model (name or path) or head directory
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_scale: int | None = None  # ngram: drafts per matched token (None: always k)
    num_layers: int | None = None  # layer_skip: layers of the target the draft runs
    draft_vocab_size: int | None = None  # eagle / medusa: draft among this many most frequent tokens
    # engine: no drafting in a step that runs more requests than this
    disable_by_batch_size: int | None = None

    @property
    def k(self) -> int:
        return self.num_speculative_tokens

    @staticmethod
    def from_dict(d: dict, target_cfg: ModelConfig) -> "SpeculativeConfig":
        """Validate a speculative_config dict against the target; errors name the value."""
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config={d!r} must be a dict")
        method = d.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config method={method!r}; choose one of {METHODS}")
        optional = _KEYS[method] + _COMMON_KEYS
        allowed = ("method", "num_speculative_tokens") + optional
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"speculative_config keys {unknown} are not known for method {method!r}; "
                             f"allowed: {allowed}")
        k = d.get("num_speculative_tokens")
        if not is_int(k) or k < 1:
            raise ValueError(f"speculative_config num_speculative_tokens={k!r} must be an integer >= 1")
        cfg = SpeculativeConfig(method=method, num_speculative_tokens=k,
                                **{key: d[key] for key in optional if key in d})
        if method in ("draft_model", "ngram_draft_model") and not cfg.model:
            raise ValueError(f"speculative_config method={method!r} needs 'model' (a name or a path)")
        if cfg.model is not None and not isinstance(cfg.model, (str, Path)):
            raise ValueError(f"speculative_config model={cfg.model!r} must be a name or a path")
        if method in ("ngram", "ngram_draft_model"):
            lo, hi = cfg.prompt_lookup_min, cfg.prompt_lookup_max
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise ValueError(f"speculative_config prompt_lookup_min={lo!r}, prompt_lookup_max={hi!r}: "
                                 "need integers with 1 <= prompt_lookup_min <= prompt_lookup_max")
        scale = cfg.prompt_lookup_scale
        if scale is not None and (not is_int(scale) or scale < 1):
            raise ValueError(f"speculative_config prompt_lookup_scale={scale!r} must be an integer >= 1 "
                             "(drafts per matched token) or None (always num_speculative_tokens)")
        if method in ("draft_model", "ngram_draft_model"):
            from jaxinfer.checkpoint import load_config
            dcfg = load_config(cfg.draft_dir())
            if dcfg.vocab_size != target_cfg.vocab_size:
                raise ValueError(f"speculative_config model={cfg.model!r} has vocab_size={dcfg.vocab_size}; "
                                 f"the target has vocab_size={target_cfg.vocab_size} (they must share a "
                                 "tokenizer)")
        if method in ("eagle", "medusa"):
            head = cfg.head_dir()
            if not (head / "head_config.json").is_file():
                raise ValueError(
                    f"speculative_config method={method!r}: no head at {str(head)!r}"
                    + ("" if cfg.model else " (a default head ships only for the embedded target; pass "
                       "'model': a head directory written by experiments/train_spec_heads.py)"))
        n = cfg.draft_vocab_size
        if n is not None:
            if not is_int(n) or not 1 <= n <= target_cfg.vocab_size:
                raise ValueError(f"speculative_config draft_vocab_size={n!r} must be an integer in "
                                 f"[1, {target_cfg.vocab_size}] (the target's vocab_size)")
            load_token_counts(cfg.head_dir(), target_cfg.vocab_size)  # present and the right size
        cap = cfg.disable_by_batch_size
        if cap is not None and (not is_int(cap) or cap < 1):
            raise ValueError(f"speculative_config disable_by_batch_size={cap!r} must be an integer >= 1")
        if method == "layer_skip":
            n = cfg.num_layers
            if n is not None and (not isinstance(n, int) or not 1 <= n <= target_cfg.num_layers):
                raise ValueError(f"speculative_config num_layers={n!r} must be an integer in "
                                 f"[1, {target_cfg.num_layers}] (the target's layers)")
        return cfg

    def draft_dir(self) -> Path:
        """The draft model's directory (an embedded model name or a path)."""
        from jaxinfer.checkpoint import CheckpointError
        from jaxinfer.llm import resolve_model
        try:
            return resolve_model(str(self.model))
        except CheckpointError as e:
            raise ValueError(f"speculative_config model={self.model!r}: {e}") from None

    def head_dir(self) -> Path:
        """EAGLE / Medusa head directory: `model`, else the head shipped for the embedded target."""
        if self.model is not None:
            return Path(self.model).expanduser()
        return HEADS_DIR / self.method


def default_skip_layers(target_cfg: ModelConfig) -> int:
    """Layer-skip depth when none is given: half the target's layers (at least 1)."""
    return max(1, target_cfg.num_layers // 2)


def load_draft_model(spec: SpeculativeConfig, dtype):
    """The draft model's (cfg, weights) in `dtype`, laid out for this backend like the target's."""
    from jaxinfer.checkpoint import load_hf
    from jaxinfer.model import runtime_layout
    dcfg, dweights = load_hf(spec.draft_dir(), jnp.dtype(dtype).name)
    return dcfg, runtime_layout(dweights)


def build_drafter(spec: SpeculativeConfig, target_cfg: ModelConfig, dtype=jnp.float32,
                  backend: str = "xla", target=None):
    """(drafter, draft_params) for the loop: loads the draft model or head from disk.
    target: the target's Weights, needed for an EAGLE / Medusa head's `draft_vocab_size`.

    Raises ValueError for a draft model with another vocabulary or a head of another target.
    """
    from jaxinfer.spec import drafters
    from jaxinfer.spec.heads import eagle_config, load_head, medusa_num_heads, with_draft_vocab

    k = spec.k
    if spec.method == "ngram":
        return drafters.NgramDrafter(k, spec.prompt_lookup_max, spec.prompt_lookup_min,
                                     spec.prompt_lookup_scale), None
    if spec.method == "layer_skip":
        n = spec.num_layers or default_skip_layers(target_cfg)
        return drafters.LayerSkipDrafter(k, target_cfg, n, backend), None
    if spec.method in ("draft_model", "ngram_draft_model"):
        dcfg, dweights = load_draft_model(spec, dtype)
        if dcfg.vocab_size != target_cfg.vocab_size:
            raise ValueError(f"speculative_config model={spec.model!r} has vocab_size={dcfg.vocab_size}; "
                             f"the target has vocab_size={target_cfg.vocab_size} (they must share a tokenizer)")
        if spec.method == "ngram_draft_model":
            return drafters.LookupDraftModelDrafter(k, dcfg, spec.prompt_lookup_max, spec.prompt_lookup_min,
                                                    backend), dweights
        return drafters.DraftModelDrafter(k, dcfg, backend), dweights
    head_dir = spec.head_dir()
    meta, params = load_head(head_dir, target_cfg, dtype)
    if meta["method"] != spec.method:
        raise ValueError(f"speculative_config model={str(head_dir)!r} is a {meta['method']!r} head, "
                         f"not {spec.method!r}")
    from jaxinfer.model import layout_projection, resolve_layout
    layout = resolve_layout(dtype)  # the head's projections as "auto" holds a model's
    if spec.draft_vocab_size is not None:
        if target is None:
            raise ValueError("speculative_config draft_vocab_size: build_drafter needs the target's weights "
                             "(target=...) to take the kept tokens' LM-head rows")
        params = with_draft_vocab(params, target, target_cfg, load_token_counts(head_dir, target_cfg.vocab_size),
                                  spec.draft_vocab_size, layout)
    if spec.method == "eagle":
        from jaxinfer.wquant import MODULES
        hcfg = eagle_config(target_cfg, meta["sizes"]["intermediate_size"])
        params = {**params, "fc": layout_projection(params["fc"], layout),
                  "layer": {n: layout_projection(w, layout) if n in MODULES else w for n, w in params["layer"].items()}}
        return drafters.EagleDrafter(k, hcfg, target_cfg, backend), params
    heads = medusa_num_heads(params)
    if k > heads:
        raise ValueError(f"speculative_config num_speculative_tokens={k} exceeds the {heads} heads of the "
                         f"Medusa head at {str(head_dir)!r}")
    return drafters.MedusaDrafter(k, target_cfg), params
