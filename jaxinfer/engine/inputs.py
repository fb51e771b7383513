"""Request validation at the boundary: prompt forms, parameters, context and KV limits.

Every check raises ValueError naming the value and what is allowed, before any
work is done, so a bad request never reaches the scheduler or a jitted function.
"""

from __future__ import annotations

import dataclasses
import operator

from jaxinfer.config import ModelConfig
from jaxinfer.sampling import SamplingParams
from jaxinfer.structured import TokenFSM, compile_token_fsm, token_texts
from jaxinfer.tokenizer import Tokenizer


@dataclasses.dataclass
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # effective: capped by the context when params.max_tokens is None
    stop_ids: list[int]  # stop_token_ids + eos (unless ignore_eos)
    bad_words_ids: list[list[int]]  # the token sequences params.bad_words bans
    fsm: TokenFSM | None = None  # params.structured_outputs as a token machine


class InputProcessor:
    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer | None, max_model_len: int,
                 kv_capacity_tokens: int | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens
        self._texts: tuple | None = None  # each token's text, for structured outputs (built on first use)

    def prompt_ids(self, p) -> tuple[str | None, list[int]]:
        if isinstance(p, str):
            return p, self._tokenizer().encode(p)
        if isinstance(p, dict) and "prompt_token_ids" in p:
            given = p["prompt_token_ids"]
            try:
                ids = [operator.index(t) for t in given]  # ints, numpy / jax integer scalars
            except TypeError:  # not iterable, or floats, strings, ...
                ids = None
            if ids is None or any(isinstance(t, bool) for t in given):
                raise ValueError(f"prompt_token_ids={given!r}: must be a list of integer token ids")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids contains {bad[0]}; token ids must be in "
                                 f"[0, {self.cfg.vocab_size})")
            return p.get("prompt"), ids
        if isinstance(p, dict) and "prompt" in p:
            return p["prompt"], self._tokenizer().encode(p["prompt"])
        raise ValueError(f"prompt {p!r}: expected a string, {{'prompt': str}} or {{'prompt_token_ids': list}}")

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model directory has no tokenizer.json; pass prompts as "
                             "{'prompt_token_ids': [...]}")
        return self.tokenizer

    def stop_ids(self, p: SamplingParams) -> list[int]:
        ids = list(p.stop_token_ids)
        if not p.ignore_eos:
            ids += [e for e in self.cfg.eos_token_ids if e not in ids]
        return ids

    def bad_words_ids(self, p: SamplingParams) -> list[list[int]]:
        """The token sequences of p.bad_words, as vLLM bans them: each word encoded alone and after
        a space (where that is another sequence), so that it is banned at the start of the output
        and after a space."""
        if not p.bad_words:
            return []
        if self.tokenizer is None:
            raise ValueError("SamplingParams.bad_words needs a tokenizer; this model directory has none")
        seqs: list[list[int]] = []
        for word in p.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in seqs:
                    seqs.append(ids)
        return seqs

    def token_fsm(self, p: SamplingParams) -> TokenFSM | None:
        """p.structured_outputs as a token table over this tokenizer (built once per constraint);
        EOS ends the output in accepting states."""
        if p.structured_outputs is None:
            return None
        if self.tokenizer is None:
            raise ValueError("SamplingParams.structured_outputs needs a tokenizer; this model directory has none")
        if self._texts is None:
            self._texts = tuple(token_texts(self.tokenizer, self.cfg.vocab_size))
        return compile_token_fsm(p.structured_outputs, self._texts, tuple(self.cfg.eos_token_ids))

    def process(self, prompt, params: SamplingParams) -> ProcessedPrompt:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, ids = self.prompt_ids(prompt)
        keep = params.truncate_prompt_tokens
        if keep is not None:  # the prompt's last tokens (its text stays as given)
            ids = ids[-(self.max_model_len - 1 if keep == -1 else keep):]
        n = len(ids)
        if n == 0:
            raise ValueError("prompt is empty (0 tokens)")
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens; max_model_len={self.max_model_len} "
                             f"leaves room for prompts of at most {self.max_model_len - 1}")
        params.validate_vocab(self.cfg.vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model directory has none")
        limit = self.max_model_len
        if self.kv_capacity_tokens is not None:
            limit = min(limit, self.kv_capacity_tokens)
            if n + 1 > self.kv_capacity_tokens:
                raise ValueError(f"prompt has {n} tokens but the KV cache holds only {self.kv_capacity_tokens} "
                                 "tokens (num_kv_pages x block_size): this request could never fit")
        if params.max_tokens is None:
            max_tokens = limit - n
        else:
            max_tokens = min(params.max_tokens, self.max_model_len - n)
            if self.kv_capacity_tokens is not None and n + max_tokens > self.kv_capacity_tokens:
                raise ValueError(
                    f"prompt ({n} tokens) + max_tokens ({max_tokens}) needs {n + max_tokens} tokens of KV but "
                    f"the cache holds only {self.kv_capacity_tokens} (num_kv_pages x block_size): this request "
                    "could never fit; lower max_tokens or grow the cache")
        stop_ids, fsm = self.stop_ids(params), self.token_fsm(params)
        if fsm is not None and params.min_tokens:
            n_end = fsm.tokens_until_forced_stop(stop_ids)
            if n_end is not None and n_end < min(params.min_tokens, max_tokens):
                raise ValueError(
                    f"SamplingParams.min_tokens={params.min_tokens} conflicts with structured_outputs: an output "
                    f"can be complete after {n_end} tokens, where only a stop token may follow; set min_tokens "
                    f"<= {n_end} (or ignore_eos=True)")
        return ProcessedPrompt(text, ids, params, max_tokens, stop_ids, self.bad_words_ids(params), fsm)
