"""Speculative decoding loop: greedy output is token-identical to plain decoding for every drafter.

Tiny random models (2 layers, hidden 64, vocab 128); batch 1 and batch 4 with mixed prompt
lengths, a stop token that occurs in the output, min_tokens and max_tokens. Also: the
n-gram lookup, head save / load, seeded sampling reproducibility, config validation.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.engine.request import EngineRequest
from jaxinfer.model import init_weights
from jaxinfer.sampling import SamplingParams
from jaxinfer.spec import SpecDecoder, SpeculativeConfig
from jaxinfer.spec import drafters as D
from jaxinfer.spec.config import build_drafter
from jaxinfer.spec.heads import (
    eagle_config,
    head_logits,
    init_eagle,
    init_medusa,
    load_head,
    save_head,
    with_draft_vocab,
)
from jaxinfer.static_batch import StaticBatchGenerator

V, K = 128, 3


def _cfg(d, layers, heads, kv_heads, ffn):
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=V, hidden_size=d, intermediate_size=ffn,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=16,
                       max_position_embeddings=256, rms_norm_eps=1e-5)


CFG = _cfg(64, 2, 4, 2, 96)
DCFG = _cfg(32, 1, 2, 1, 64)  # another vocabulary's draft, for the error test
# a Gemma 3-style target: (1 + w) norms, sandwich norms, GeGLU, a sliding and a global layer with
# RoPE bases of their own, soft-capped logits
GEMMA_CFG = dataclasses.replace(
    CFG, architecture="Gemma3ForCausalLM", hidden_act="gelu_pytorch_tanh", norm_style="gemma",
    scale_embeddings=True, sandwich_norms=True, qk_norm=True, query_pre_attn_scalar=24.0, sliding_window=6,
    layer_types=("sliding_attention", "full_attention"), local_rope_theta=500.0, final_logit_softcapping=4.0)
# a Qwen3-MoE-style target: layer 0 routes each token to 2 of 6 experts, layer 1 is dense
MOE_CFG = dataclasses.replace(CFG, architecture="Qwen3MoeForCausalLM", qk_norm=True, num_experts=6,
                              num_experts_per_tok=2, moe_intermediate_size=32, dense_layers=(1,))


@pytest.fixture(scope="module")
def models():
    w = init_weights(CFG, jax.random.PRNGKey(0), std=0.15)
    # A draft that agrees with the target often but not always: both the all-accepted path
    # (its cache must catch up on d_k) and rejections get exercised.
    noise = init_weights(CFG, jax.random.PRNGKey(1), std=0.05)
    dw = jax.tree_util.tree_map(lambda a, b: a + b, w, noise)
    hcfg = eagle_config(CFG, 64)
    eagle = init_eagle(hcfg, jax.random.PRNGKey(2))
    counts = np.random.default_rng(0).integers(0, 1000, V)  # any ranking: the loop must stay lossless
    return {
        "ngram": (D.NgramDrafter(K, 3, 1), None),
        "ngram_scaled": (D.NgramDrafter(K, 3, 1, scale=1), None),  # drafts of 1, 2 or 3 tokens
        "draft_model": (D.DraftModelDrafter(K, CFG), dw),
        "ngram_draft_model": (D.LookupDraftModelDrafter(K, CFG, 3, 1), dw),
        "layer_skip": (D.LayerSkipDrafter(K, CFG, 1), None),
        "eagle": (D.EagleDrafter(K, hcfg, CFG), eagle),
        "eagle_vocab": (D.EagleDrafter(K, hcfg, CFG), with_draft_vocab(eagle, w, CFG, counts, 40)),
        "medusa": (D.MedusaDrafter(K, CFG), init_medusa(64, K, 32, jax.random.PRNGKey(3))),
    }, w


PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6],  # periodic: the n-gram lookup has matches
    [9, 10, 11],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35],
    [40, 41, 40, 41, 40],
]
MAX_TOKENS = [24, 17, 20, 11]


def _requests(params, stop_ids, min_tokens=(0, 0, 6, 0), seeds=(100, 101, 102, 103)):
    reqs = []
    for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        sp = SamplingParams(temperature=params.temperature, top_k=params.top_k, max_tokens=m,
                            min_tokens=min(min_tokens[i], m))
        reqs.append(EngineRequest(str(i), None, p, sp, seed=seeds[i], sample_index=0, stop_ids=list(stop_ids),
                                  max_tokens=m, tokenizer=None))
    return reqs


@pytest.fixture(scope="module")
def reference(models):
    """Plain greedy decoding (StaticBatchGenerator), with a stop token that occurs in the output."""
    _, w = models
    gen = StaticBatchGenerator(w, CFG, max_model_len=256)
    free = _requests(SamplingParams(temperature=0), [])
    gen.run(free, batch_size=4)
    outs = [r.output_ids for r in free]
    stop = outs[0][5]  # row 0 stops early; row 2 (min_tokens 6) may have to pass it
    reqs = _requests(SamplingParams(temperature=0), [stop])
    gen.run(reqs, batch_size=4)
    out = [(r.output_ids, r.finish_reason) for r in reqs]
    assert out[0][1] == "stop" and any(reason == "length" for _, reason in out)
    return stop, out


@pytest.mark.parametrize("name", ["ngram", "ngram_scaled", "draft_model", "ngram_draft_model", "layer_skip", "eagle",
                                  "eagle_vocab", "medusa"])
def test_greedy_identical_to_plain_decoding(models, reference, name):
    drafters, w = models
    drafter, params = drafters[name]
    stop, expected = reference
    dec = SpecDecoder(w, CFG, None, max_model_len=256, drafter=drafter, draft_params=params)
    for bs in (4, 1):
        reqs = _requests(SamplingParams(temperature=0), [stop])
        dec.run(reqs, batch_size=bs)
        assert [(r.output_ids, r.finish_reason) for r in reqs] == expected, (name, bs)
    s = dec.stats
    assert s.forwards > 0 and 0 <= s.accepted <= s.drafted <= K * s.forwards
    if not name.startswith("ngram"):
        assert s.drafted == K * s.forwards
    if name in ("ngram", "ngram_scaled", "draft_model", "ngram_draft_model"):  # predictable prompts / a close draft
        assert s.accepted > 0
    if name in ("draft_model", "ngram_draft_model"):
        assert s.accepted < s.drafted


@pytest.mark.parametrize("name", ["ngram", "ngram_scaled", "ngram_draft_model"])
def test_round_choice_copies_no_cache(models, name):
    """The rounds that choose between two verifications (n-gram: drafts or a plain step; lookup or
    the draft model) compile without a copy of any K/V cache buffer: XLA:CPU copies the buffers a
    conditional's branches both update in place, which `loop._either` avoids. Before it, every
    round copied the target's whole cache (and the draft model's) several times."""
    import re

    from jaxinfer.spec.loop import SpecStatics, spec_decode, spec_prefill
    drafters, w = models
    drafter, params = drafters[name]
    reqs = _requests(SamplingParams(temperature=0), [])
    gen = StaticBatchGenerator(w, CFG, max_model_len=256)
    _, tokens, lens, st, limits, pen = gen._prepare(reqs)
    statics = SpecStatics(max_len=128, max_new=32, greedy=True)
    state, _ = spec_prefill(w, CFG, drafter, params, statics, tokens, lens, st, limits, pen)
    hlo = spec_decode.lower(w, CFG, drafter, params, statics, state, st, limits, jnp.int32(4)).compile().as_text()
    caches = {tuple(x.shape) for x in jax.tree_util.tree_leaves((state.kv, state.draft)) if x.ndim == 4}
    assert caches  # the target's [B, K, S, H] per layer (and the draft model's)
    copied = [tuple(int(d) for d in m.group(1).split(","))
              for m in re.finditer(r"= \w+\[([\d,]+)\]\S* copy\(", hlo)]
    assert not [shape for shape in copied if shape in caches], name


PENALTIES = [dict(repetition_penalty=1.4, frequency_penalty=1.5), dict(presence_penalty=2.0),
             dict(logit_bias={6: 4.0, 41: -30.0}, frequency_penalty=0.7), dict(allowed_token_ids=[5, 6, 7, 8, 40, 41, 60, 61])]


def _penalized_requests(bad_words=()):
    """One penalty or bias per row, greedy; each decides some of the row's tokens. bad_words:
    token sequences the last row also bans."""
    reqs = []
    for i, (p, m, pen) in enumerate(zip(PROMPTS, MAX_TOKENS, PENALTIES)):
        last = i == len(PROMPTS) - 1 and bad_words
        sp = SamplingParams(temperature=0, max_tokens=m, **pen, bad_words=["(ids below)"] if last else None)
        reqs.append(EngineRequest(str(i), None, p, sp, seed=100 + i, sample_index=0, stop_ids=[], max_tokens=m,
                                  tokenizer=None, bad_words_ids=list(bad_words) if last else None))
    return reqs


@pytest.fixture(scope="module")
def penalized_reference(models):
    """(bad words of the last row, plain decoding's tokens). The bad words are a two- and a
    three-token sequence that the row writes without them."""
    _, w = models
    reqs = _penalized_requests()
    StaticBatchGenerator(w, CFG, max_model_len=256).run(reqs, batch_size=4)
    plain = _requests(SamplingParams(temperature=0), [])
    StaticBatchGenerator(w, CFG, max_model_len=256).run(plain, batch_size=4)
    changed = [r.output_ids != q.output_ids for r, q in zip(reqs, plain)]
    assert all(changed), changed  # every row's penalty changes its greedy output
    row = reqs[-1].output_ids
    bad = [row[1:3], row[5:8]]
    banned = _penalized_requests(bad)
    StaticBatchGenerator(w, CFG, max_model_len=256).run(banned, batch_size=4)
    out = banned[-1].output_ids
    assert out != row and not any(out[i:i + len(s)] == s for s in bad for i in range(len(out)))
    return bad, [r.output_ids for r in banned]


@pytest.mark.parametrize("name", ["ngram", "ngram_scaled", "draft_model", "layer_skip", "eagle", "medusa"])
def test_greedy_with_penalties_identical_to_plain_decoding(models, penalized_reference, name):
    """Penalties, biases and bad words shape every verified position as plain decoding would have
    shaped it, counting the drafts before it as generated: the tokens are the same."""
    drafters, w = models
    drafter, params = drafters[name]
    bad, reference = penalized_reference
    dec = SpecDecoder(w, CFG, None, max_model_len=256, drafter=drafter, draft_params=params)
    reqs = _penalized_requests(bad)
    dec.run(reqs, batch_size=4)
    assert [r.output_ids for r in reqs] == reference
    if name in ("ngram", "draft_model"):
        assert dec.stats.accepted > 0
    if name == "draft_model":  # the target drafting for itself penalizes each draft as the verifier will
        dec = SpecDecoder(w, CFG, None, max_model_len=256, drafter=drafter, draft_params=w)
        reqs = _penalized_requests(bad)
        dec.run(reqs, batch_size=4)
        assert [r.output_ids for r in reqs] == reference
        assert dec.stats.accepted == dec.stats.drafted > 0


def test_lookup_draft_model_catches_its_cache_up_before_drafting(models):
    """Lookup rounds leave the draft model alone; a model round first feeds it the last
    catch_up tokens. After a gap of g <= catch_up tokens its cache equals a full prefill of
    the sequence; the loop with this drafter never abstains (rows without a match draft with
    the model)."""
    from jaxinfer.sampling import SamplingTensors, row_limits
    _, w = models
    drafter = D.LookupDraftModelDrafter(K, CFG, 3, 1)
    assert drafter.model.catch_up == 2 * (K + 1)
    seq = jnp.asarray([[7, 3, 9, 12, 5, 5, 30, 2, 8, 41, 17, 6, 90, 11]], jnp.int32)  # x_P = seq[0, -1]
    p = seq.shape[1] - 1
    history = jnp.zeros((1, 64), jnp.int32).at[:, :p + 1].set(seq)
    st = SamplingTensors.from_params([SamplingParams(temperature=0)], [0], V)
    limits = row_limits([32], [0], [[]], V)
    full = drafter.prefill(w, w, drafter.init(w, 1, 64, jnp.float32), seq, jnp.asarray([p + 1]), None, None)
    for gap in (1, 5, drafter.model.catch_up - 1):  # tokens the draft cache lacks before P
        state = drafter.prefill(w, w, drafter.init(w, 1, 64, jnp.float32), seq, jnp.asarray([p - gap]), None, None)
        ctx = D.DraftContext(tokens=seq[:, -1], kv_lens=jnp.asarray([p]), active=jnp.asarray([True]),
                             history=history, num_generated=jnp.asarray([1]), st=st, limits=limits, greedy=True)
        _, _, state, _ = drafter.propose(w, w, None, state, ctx)
        for got, want in zip(state["kv"].k + state["kv"].v, full["kv"].k + full["kv"].v):
            np.testing.assert_allclose(np.asarray(got[0, :, :p + 1]), np.asarray(want[0, :, :p + 1]), atol=2e-5)
    dec = SpecDecoder(w, CFG, None, max_model_len=256, drafter=drafter, draft_params=w)
    reqs = _requests(SamplingParams(temperature=0), [])[1:3]  # no lookup match at first: model rounds
    dec.run(reqs, batch_size=2)
    assert dec.stats.drafted == K * dec.stats.forwards > 0


@pytest.mark.parametrize("name", ["draft_model", "ngram_scaled"])
def test_sampled_rows_are_reproducible_and_batch_independent(models, name):
    """A seeded row emits the same tokens whoever its batch-mates are; with ngram_scaled a row
    whose proposal is shorter than the round's width has -1 there, rejected, and its next token
    drawn with the key a plain step would use."""
    drafters, w = models
    drafter, params = drafters[name]
    dec = SpecDecoder(w, CFG, None, max_model_len=256, drafter=drafter, draft_params=params)
    sp = SamplingParams(temperature=0.8, top_k=20)
    a = _requests(sp, [])
    dec.run(a, batch_size=4)
    again = _requests(sp, [])
    dec.run(again, batch_size=4)
    assert [r.output_ids for r in again] == [r.output_ids for r in a]
    other_mates = _requests(sp, [], seeds=(100, 7, 8, 9))  # row 0 keeps its seed, its batch-mates change
    dec.run(other_mates, batch_size=4)
    assert other_mates[0].output_ids == a[0].output_ids
    assert [r.output_ids for r in other_mates[1:]] != [r.output_ids for r in a[1:]]
    assert all(len(r.output_ids) == m for r, m in zip(a, MAX_TOKENS))
    if name == "draft_model":
        assert 0 < dec.stats.accepted < dec.stats.drafted
    else:  # lookup drafts on a random model are rarely accepted at T 0.8: rounds of mixed widths ran
        assert dec.stats.drafted > 0 and dec.stats.drafted % K != 0


def test_ngram_lookup_most_recent_match_and_periodic_continuation():
    h = jnp.array([[1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3, 0, 0, 0, 0],
                   [4, 5, 4, 5, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                   [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    last = jnp.array([11, 4, 5])
    d = np.asarray(jax.jit(D.ngram_lookup, static_argnums=(2, 3, 4))(h, last, 4, 3, 2))
    assert d[0].tolist() == [7, 8, 1, 2]  # "1 2 3" last seen at 4..6, followed by 7 8 1 2
    assert d[1].tolist() == [5, 4, 5, 4]  # "5 4" at 1..2 -> continues with period 2
    assert d[2].tolist() == [-1, -1, -1, -1]  # no match: no proposal


def test_scaled_lookup_proposes_by_match_length():
    """prompt_lookup_scale: a match of n tokens proposes lookup_lengths[n] of what followed it."""
    assert D.draft_widths(8) == (1, 2, 4, 8) and D.draft_widths(6) == (1, 2, 4, 6) and D.draft_widths(1) == (1,)
    assert D.lookup_lengths(8, 4, 2) == (0, 2, 4, 8, 8)  # 2n, rounded up to a width: 2, 4, 6 -> 8, 8
    assert D.lookup_lengths(4, 3, 1) == (0, 1, 2, 4)
    h = jnp.array([[1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3, 0, 0, 0, 0],
                   [6, 4, 5, 7, 0, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                   [3, 8, 2, 5, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                   [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    last = jnp.array([11, 6, 4, 5])
    lookup = jax.jit(D.ngram_lookup, static_argnums=(2, 3, 4, 5))
    d = np.asarray(lookup(h, last, 4, 3, 1, D.lookup_lengths(4, 3, 1)))
    assert d[0].tolist() == [7, 8, 1, 2]  # "1 2 3" matched: 3 tokens -> all 4
    assert d[1].tolist() == [7, 0, -1, -1]  # only "4 5" matched: 2
    assert d[2].tolist() == [8, -1, -1, -1]  # only "3": 1
    assert d[3].tolist() == [-1, -1, -1, -1]
    full = np.asarray(lookup(h, last, 4, 3, 1, None))
    assert full[1].tolist() == [7, 0, 4, 5] and full[2].tolist() == [8, 2, 5, 3]  # unscaled: k for any n
    from jaxinfer.engine.runner import ngram_propose
    for i, p in enumerate(np.asarray(last).tolist()):  # the engine's host lookup proposes the same
        got = ngram_propose(np.asarray(h)[i, :p + 1].tolist(), 4, 1, 3, 1)
        want = [t for t in d[i].tolist() if t >= 0]
        assert (got is None and not want) or got.tolist() == want, i


@pytest.mark.parametrize("cfg", [CFG, GEMMA_CFG], ids=["llama", "gemma"])
def test_draft_vocab_scores_only_the_most_frequent_tokens(models, cfg):
    """with_draft_vocab keeps the N most frequent tokens; head_logits equals the full LM head's
    logits there and is -inf elsewhere, so EAGLE / Medusa draft only those tokens (through the
    target's own final norm and logit soft-capping: Gemma's differ from Llama's)."""
    from jaxinfer.model import lm_logits
    _, w = models
    w = w.replace(final_norm=w.final_norm - 1.3)  # (1 + w) and w give different norms
    counts = np.zeros(V, np.int64)
    counts[[5, 17, 99, 3]] = [10, 50, 20, 10]  # ties (3 and 5) break towards the lower id
    head = with_draft_vocab({}, w, cfg, counts, 3)
    assert np.asarray(head["draft_ids"]).tolist() == [3, 17, 99]
    h = jax.random.normal(jax.random.PRNGKey(4), (2, cfg.hidden_size))
    got, full = np.asarray(head_logits(head, w, h, cfg)), np.asarray(lm_logits(w, h, cfg))
    np.testing.assert_allclose(got[:, [3, 17, 99]], full[:, [3, 17, 99]], rtol=1e-5, atol=1e-5)
    assert np.isneginf(np.delete(got, [3, 17, 99], axis=1)).all()
    with pytest.raises(ValueError, match="draft_vocab_size=0"):
        with_draft_vocab({}, w, CFG, counts, 0)


@pytest.mark.parametrize("target", ["gemma", "moe"])
@pytest.mark.parametrize("name", ["layer_skip", "eagle"])
def test_other_targets_greedy_identical_to_plain_decoding(target, name):
    """A Gemma 3-style target (per-layer sliding windows and RoPE, soft-capped logits) and a
    mixture-of-experts one: the first layer alone (layer skip) or a one-layer EAGLE head (a dense
    Llama layer: eagle_config) drafts, and the output is plain greedy decoding's."""
    cfg = {"gemma": GEMMA_CFG, "moe": MOE_CFG}[target]
    w = init_weights(cfg, jax.random.PRNGKey(5), std=0.15)
    hcfg = eagle_config(cfg, 64)
    assert hcfg.layer_types is None and hcfg.norm_style == "llama" and hcfg.hidden_act == "silu"
    assert hcfg.num_experts == 0
    drafter, params = {"layer_skip": (D.LayerSkipDrafter(K, cfg, 1), None),
                       "eagle": (D.EagleDrafter(K, hcfg, cfg), init_eagle(hcfg, jax.random.PRNGKey(6)))}[name]
    plain = _requests(SamplingParams(temperature=0), [])
    StaticBatchGenerator(w, cfg, max_model_len=256).run(plain, batch_size=4)
    reqs = _requests(SamplingParams(temperature=0), [])
    SpecDecoder(w, cfg, None, max_model_len=256, drafter=drafter, draft_params=params).run(reqs, batch_size=4)
    assert [r.output_ids for r in reqs] == [r.output_ids for r in plain]


def test_draft_vocab_size_reads_the_heads_token_counts(models, tmp_path):
    _, w = models
    hcfg = eagle_config(CFG, 64)
    save_head(tmp_path, "eagle", init_eagle(hcfg, jax.random.PRNGKey(0)), CFG, {"intermediate_size": 64},
              dtype=jnp.float32)
    conf = {"method": "eagle", "num_speculative_tokens": 2, "model": str(tmp_path), "draft_vocab_size": 8}
    with pytest.raises(ValueError, match="no token_counts.npy"):
        SpeculativeConfig.from_dict(conf, CFG)
    np.save(tmp_path / "token_counts.npy", np.arange(V - 1))
    with pytest.raises(ValueError, match=rf"\({V - 1},\) counts"):
        SpeculativeConfig.from_dict(conf, CFG)
    np.save(tmp_path / "token_counts.npy", np.arange(V))  # the 8 largest ids are the most frequent
    spec = SpeculativeConfig.from_dict(conf, CFG)
    with pytest.raises(ValueError, match="needs the target's weights"):
        build_drafter(spec, CFG)
    _, params = build_drafter(spec, CFG, target=w)
    assert np.asarray(params["draft_ids"]).tolist() == list(range(V - 8, V))


def test_head_save_load_roundtrip_and_checks(tmp_path):
    hcfg = eagle_config(CFG, 64)
    head = init_eagle(hcfg, jax.random.PRNGKey(0))
    save_head(tmp_path / "eagle", "eagle", head, CFG, {"intermediate_size": 64}, dtype=jnp.float32)
    meta, loaded = load_head(tmp_path / "eagle", CFG)
    assert meta["method"] == "eagle"
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), head, loaded))
    spec = SpeculativeConfig.from_dict({"method": "eagle", "num_speculative_tokens": 2,
                                        "model": str(tmp_path / "eagle")}, CFG)
    drafter, _ = build_drafter(spec, CFG)
    assert isinstance(drafter, D.EagleDrafter) and drafter.cfg.intermediate_size == 64
    other = _cfg(32, 2, 2, 1, 64)
    with pytest.raises(ValueError, match="hidden_size=64"):
        load_head(tmp_path / "eagle", other)
    save_head(tmp_path / "medusa", "medusa", init_medusa(64, 2, 16, jax.random.PRNGKey(1)), CFG,
              {"num_heads": 2, "inner": 16})
    spec = SpeculativeConfig.from_dict({"method": "medusa", "num_speculative_tokens": 3,
                                        "model": str(tmp_path / "medusa")}, CFG)
    with pytest.raises(ValueError, match="num_speculative_tokens=3 exceeds the 2 heads"):
        build_drafter(spec, CFG)
    with pytest.raises(ValueError, match="is a 'medusa' head, not 'eagle'"):
        build_drafter(SpeculativeConfig.from_dict({"method": "eagle", "num_speculative_tokens": 1,
                                                   "model": str(tmp_path / "medusa")}, CFG), CFG)


@pytest.mark.parametrize("d,match", [
    ({"method": "medusa2", "num_speculative_tokens": 2}, "method='medusa2'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, r"keys \['model'\]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min=5"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_scale": 0}, "prompt_lookup_scale=0"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": "stdlib-draft", "prompt_lookup_scale": 2},
     r"keys \['prompt_lookup_scale'\]"),
    ({"method": "layer_skip", "num_speculative_tokens": 2, "num_layers": 3}, "num_layers=3"),
    ({"method": "eagle", "num_speculative_tokens": 2, "draft_vocab_size": V + 1}, f"draft_vocab_size={V + 1}"),
    ({"method": "medusa", "num_speculative_tokens": 2, "draft_vocab_size": 0}, "draft_vocab_size=0"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "ngram_draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "ngram_draft_model", "num_speculative_tokens": 2, "model": "stdlib-draft",
      "prompt_lookup_max": 0}, "prompt_lookup_max=0"),
    ({"method": "eagle", "num_speculative_tokens": 2, "model": "/nonexistent/head"}, "no head at"),
])
def test_config_errors_name_the_value(d, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.from_dict(d, CFG)


def test_draft_model_with_other_vocabulary_is_rejected(tmp_path):
    other = ModelConfig(**{**DCFG.__dict__, "vocab_size": 64})
    (tmp_path / "config.json").write_text(json.dumps(other.to_hf_dict()))
    with pytest.raises(ValueError, match="vocab_size=64"):
        SpeculativeConfig.from_dict({"method": "draft_model", "model": str(tmp_path),
                                     "num_speculative_tokens": 2}, CFG)
