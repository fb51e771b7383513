"""The shipped models: they load by name, share one tokenizer, and were trained on files
disjoint from the held-out evaluation split."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import LLM, SamplingParams, corpus
from jaxinfer.checkpoint import load_config
from jaxinfer.llm import ASSETS, embedded_models, resolve_model
from jaxinfer.outputs import perplexity
from jaxinfer.spec.config import HEADS_DIR
from jaxinfer.spec.heads import load_head

TEXT = 'def __init__(self, name, value=None):\n    """Store ünïcode and\ttabs."""\n    self._x = {1: [2, 3]}\n'


def test_both_models_ship_with_one_tokenizer():
    assert {"stdlib-target", "stdlib-draft"} <= set(embedded_models())
    target, draft = load_config(resolve_model("stdlib-target")), load_config(resolve_model("stdlib-draft"))
    assert target.vocab_size == draft.vocab_size
    assert target.num_kv_heads < target.num_heads  # GQA, so every feature is exercised on it
    tok_t = (ASSETS / "stdlib-target" / "tokenizer.json").read_bytes()
    assert tok_t == (ASSETS / "stdlib-draft" / "tokenizer.json").read_bytes()
    # The draft is the cheap one: roughly 10x fewer matmul FLOPs per token.
    def flops(c):
        per_layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim \
            + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
        return c.num_layers * per_layer + c.hidden_size * c.vocab_size
    assert 7 <= flops(target) / flops(draft) <= 14


@pytest.fixture(scope="module")
def target():
    return LLM()


def test_default_llm_is_the_target_and_tokenizer_round_trips(target):
    assert target.model_dir == resolve_model("stdlib-target")
    tok = target.get_tokenizer()
    ids = tok.encode(TEXT)
    assert ids[0] == corpus.BOS
    assert tok.decode(ids) == TEXT
    # Python source compresses well under the code-trained BPE (the model card reports ~3.6 bytes/token).
    assert len(TEXT.encode()) / len(ids) > 2.0


def test_target_writes_python(target):
    out = target.generate(["def __init__(self"], SamplingParams(temperature=0, max_tokens=24))[0]
    text = out.outputs[0].text
    assert len(out.outputs[0].token_ids) == 24
    # A trained model continues the parameter list; random weights would emit any of 4,096 tokens.
    assert text[0] in ",)", text
    assert text.isascii(), text


def test_target_beats_the_draft_and_a_unigram_model_on_heldout_text(target):
    """Held-out perplexity ordering (the model card has the full numbers): target < draft << unigram."""
    root = corpus.stdlib_root()
    text = (root / "json" / "decoder.py").read_text()
    tok = target.get_tokenizer()
    ids = tok.encode(text)[:384]
    nll = {}
    for name in ("stdlib-target", "stdlib-draft"):
        llm = target if name == "stdlib-target" else LLM(name)
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        nll[name] = float(np.log(perplexity(out.prompt_logprobs, ids)))
    uniform = float(np.log(target.cfg.vocab_size))
    assert nll["stdlib-target"] < nll["stdlib-draft"] < uniform - 3.0, nll


def test_heldout_packages_are_not_in_the_training_split():
    files = corpus.corpus_files()
    train_files, held = corpus.split_files(files)
    assert set(train_files).isdisjoint(held)
    assert all(corpus.package_of(f) in corpus.HELDOUT_PACKAGES for f in held)


@pytest.mark.parametrize("method", ["eagle", "medusa"])
def test_shipped_heads_load_for_the_target(method):
    cfg = load_config(resolve_model("stdlib-target"))
    meta, params = load_head(HEADS_DIR / method, cfg, jnp.float32)
    assert meta["method"] == method
    recipe = json.loads((HEADS_DIR / method / "head_config.json").read_text())
    assert "command" in json.dumps(recipe)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
