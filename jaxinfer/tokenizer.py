"""Tokenizer: a thin wrapper over HF `tokenizers`, plus incremental detokenization."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from jaxinfer.chat import load_chat_template, render_chat, select_template


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text over a tokenizer.json."""

    def __init__(self, hf: _HFTokenizer, bos_token_id: int | None = None,
                 eos_token_ids: tuple[int, ...] = ()):
        self._tok = hf
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.all_special_ids = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self.chat_template: str | dict[str, str] | None = None  # Jinja source (or named ones); None: none
        self.special_tokens: dict[str, str] = {}  # {"bos_token": "<s>", ...} for templates
        self.name = "the tokenizer"

    @classmethod
    def from_dir(cls, model_dir: str | Path, bos_token_id=None, eos_token_ids=()) -> "Tokenizer | None":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            hf = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"{path}: cannot be read as a tokenizer ({e})") from None
        # tokenizer_config.json may ask for a BOS token the post-processor does not add.
        add_bos = False
        tc = Path(model_dir) / "tokenizer_config.json"
        if tc.is_file():
            try:
                add_bos = bool(json.loads(tc.read_text()).get("add_bos_token", False))
            except json.JSONDecodeError as e:
                raise ValueError(f"{tc}: not valid JSON ({e.msg} at line {e.lineno})") from None
        tok = cls(hf, bos_token_id, eos_token_ids)
        tok._add_bos = add_bos and bos_token_id is not None
        tok.chat_template, tok.special_tokens = load_chat_template(model_dir)
        tok.name = str(model_dir)
        return tok

    _add_bos = False

    def apply_chat_template(self, messages, tokenize: bool = True, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tools: list[dict] | None = None,
                            chat_template: str | None = None, **kwargs) -> str | list[int]:
        """One conversation rendered by the chat template (transformers' `apply_chat_template`: same
        defaults, same text): the text, or its ids when tokenize (no special tokens added: the
        template writes them). chat_template: Jinja source, or the name of one of the checkpoint's
        named templates; default: the checkpoint's."""
        source = select_template(self.chat_template, chat_template, tools, self.name)
        text = render_chat(source, messages, special_tokens=self.special_tokens,
                           add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, tools=tools, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)


class IncrementalDetokenizer:
    """Text of a growing token sequence, emitted as deltas.

    Decoding one token at a time breaks byte-level BPE (a character can span
    tokens) and word-boundary spacing; so, as vLLM does, decode a short window
    before the new tokens and emit only what extends it, holding back a trailing
    replacement character until its bytes are complete.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # context for correct spacing of the first token
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes (maybe "")."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: emit whatever was held back (even if incomplete)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: list[str], new_chars: int) -> tuple[int, str] | None:
    """Earliest stop string that ends within the last new_chars of text: (start, stop)."""
    best = None
    for s in stops:
        start = max(0, len(text) - new_chars - len(s) + 1)
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
