"""Sampler: validation, masks that hold, frequencies that match the softmax, seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.sampling import (
    SamplingParams,
    SamplingTensors,
    filter_logits,
    request_key,
    request_keys,
    sample,
    token_logprobs,
)

V = 12


def _tensors(n, vocab=V, **kw):
    p = SamplingParams(**kw)
    return SamplingTensors.from_params([p] * n, list(range(n)), vocab)


def _draws(logits_row, n, **kw):
    """n independent draws from one logits row (different request seeds)."""
    st = _tensors(n, vocab=logits_row.shape[-1], **kw)
    logits = jnp.broadcast_to(logits_row, (n, logits_row.shape[-1]))
    return np.asarray(jax.jit(sample)(logits, st, jnp.zeros((n,), jnp.int32)))


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", 1.5), ("max_tokens", 0), ("n", 0), ("logprobs", -1),
    ("prompt_logprobs", -3), ("min_tokens", -1), ("seed", 1.5), ("stop", [""]),
    ("stop_token_ids", [-4]),
    # a bare value where a list belongs: a ValueError naming the field, not a TypeError from list()
    ("stop_token_ids", 5), ("stop", 5), ("allowed_token_ids", 7), ("allowed_token_ids", "12"), ("bad_words", 3),
    ("ignore_eos", "yes"), ("skip_special_tokens", None), ("include_stop_str_in_output", 1),
    # True is an int to Python, not a count, a seed or a token id
    ("max_tokens", True), ("n", True), ("top_k", True), ("seed", False), ("logprobs", True),
    ("min_tokens", True), ("stop_token_ids", [True]),
])
def test_invalid_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_raises():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.2),
                                dict(top_k=5, top_p=0.7, min_p=0.05)])
def test_filters_never_emit_a_masked_token(kw):
    logits = jax.random.normal(jax.random.PRNGKey(0), (V,)) * 2
    probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs)
    allowed = set(range(V))
    if "min_p" in kw:
        allowed &= {i for i in range(V) if probs[i] >= kw["min_p"] * probs.max()}
    if "top_k" in kw:
        allowed &= set(order[:kw["top_k"]].tolist())
    if "top_p" in kw:
        kept = [i for i in order if i in allowed]
        p_sub = probs[kept] / probs[kept].sum()
        n_keep = int(np.sum(np.cumsum(p_sub) - p_sub < kw["top_p"]))
        allowed = set(kept[:max(n_keep, 1)])
    draws = _draws(logits, 4000, temperature=1.0, **kw)
    assert set(draws.tolist()) <= allowed
    assert len(set(draws.tolist())) == len(allowed)  # and every allowed token does occur


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_temperature_frequencies_match_softmax(temperature):
    """Chi-square goodness of fit, df = V - 1 = 11; critical value at p = 0.001 is 31.26."""
    logits = jax.random.normal(jax.random.PRNGKey(1), (V,))
    n = 20000
    draws = _draws(logits, n, temperature=temperature)
    expected = np.asarray(jax.nn.softmax(logits / temperature)) * n
    observed = np.bincount(draws, minlength=V)
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    assert chi2 < 31.26, (chi2, observed, expected)


def test_greedy_rows_and_sampled_rows_mix_in_one_batch():
    logits = jax.random.normal(jax.random.PRNGKey(2), (4, V))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=2),
              SamplingParams(temperature=0), SamplingParams(temperature=1.0)]
    st = SamplingTensors.from_params(params, [0, 1, 2, 3], V)
    tok = np.asarray(sample(logits, st, jnp.zeros((4,), jnp.int32)))
    am = np.asarray(jnp.argmax(logits, -1))
    assert tok[0] == am[0] and tok[2] == am[2]
    assert tok[1] in np.argsort(-np.asarray(logits[1]))[:2]


def test_same_seed_same_draws_different_seed_different():
    logits = jnp.zeros((1, 1000))  # uniform: draws are pure randomness
    p = SamplingParams(temperature=1.0)

    fn = jax.jit(sample)

    def draws(seed):
        st = SamplingTensors.from_params([p], [seed], 1000)
        return [int(fn(logits, st, jnp.array([i]))[0]) for i in range(8)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_seeds_of_any_size_keep_all_their_bits():
    """jax.random.key keeps a seed's low 32 bits (0 and 2**32 gave one key, -1 and 2**32 - 1
    another) and raised OverflowError past int64; request keys use every bit and accept any int."""
    seeds = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, -1, -(2**32), 2**63, -(2**63) - 1, 2**64 - 1, 2**64, 2**70, -(2**70)]
    keys = {tuple(request_key(s)) for s in seeds}
    assert len(keys) == len(seeds)
    for s in [0, 7, 2**31, 2**32 - 1]:  # seeds that always had a key of their own keep it
        assert (request_key(s, 3) == np.asarray(jax.random.key_data(
            jax.random.fold_in(jax.random.key(s), 3)))).all()
    # the batched keys (one device call for the seeds below 2**32, `request_key` for the rest) are
    # the per-row keys, bit for bit, in the rows' order
    idx = [i % 5 for i in range(len(seeds))]
    mixed, mixed_idx = [*seeds, 5, 2**31, 3], [*idx, 2**32 - 1, 0, 4]
    assert np.array_equal(request_keys(mixed, mixed_idx),
                          np.stack([request_key(s, i) for s, i in zip(mixed, mixed_idx)]))


def test_filter_is_identity_when_disabled():
    logits = jax.random.normal(jax.random.PRNGKey(3), (2, V))
    st = _tensors(2, temperature=1.0)
    np.testing.assert_allclose(filter_logits(logits, st), logits, rtol=1e-6)


def test_filter_keeps_the_whole_tail_when_disabled_at_a_large_vocab():
    """top_p=1 and top_k off keep every token, even where a float32 running sum of the sorted
    probabilities reaches 1.0 before the last token (a peaked 4,096-token row)."""
    logits = jnp.concatenate([jnp.array([30.0]), jax.random.normal(jax.random.PRNGKey(4), (4095,))])[None]
    out = filter_logits(logits, _tensors(1, vocab=4096, temperature=1.0))
    assert bool(jnp.all(jnp.isfinite(out)))


def _kept_reference(row, top_k, top_p):
    """Token set kept by top-k then top-p, by sorting in numpy (vLLM's rule: every token tied
    with the k-th / last kept logit stays; top-p normalizes over what top-k kept)."""
    keep = np.ones(row.shape, bool)
    if 0 < top_k < row.size:
        keep &= row >= np.sort(row)[::-1][top_k - 1]
    if top_p < 1:
        probs = np.where(keep, np.exp(row - row.max()), 0.0)
        probs /= probs.sum()
        order = np.argsort(-row, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        last = order[max(int(np.sum(before < top_p)), 1) - 1]
        keep &= row >= row[last]
    return keep


@pytest.mark.parametrize("vocab,ties", [(12, False), (4096, False), (4096, True)])
def test_top_k_top_p_threshold_search_matches_a_sort(vocab, ties):
    """The bisection finds the same k-th and top-p thresholds a full sort does, row by row,
    in a batch mixing filters on and off, including logits with many exact ties."""
    rng = np.random.default_rng(vocab + ties)
    rows = 24
    x = (rng.normal(size=(rows, vocab)) * rng.uniform(0.5, 4, size=(rows, 1))).astype(np.float32)
    if ties:
        x = np.round(x, 1)
    params = [SamplingParams(temperature=1.0, top_k=int(rng.choice([0, 1, 3, 50])),
                             top_p=float(rng.choice([1.0, 0.95, 0.5, 0.1]))) for _ in range(rows)]
    st = SamplingTensors.from_params(params, list(range(rows)), vocab)
    out = np.asarray(jax.jit(filter_logits)(jnp.asarray(x), st))
    for i, p in enumerate(params):
        np.testing.assert_array_equal(np.isfinite(out[i]), _kept_reference(x[i], p.top_k, p.top_p),
                                      err_msg=f"row {i}: top_k={p.top_k} top_p={p.top_p}")


def test_token_logprobs_rank_and_top():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.0]])
    lp, rank, top_ids, top_lp = token_logprobs(logits, jnp.array([2]), 2)
    ref = jax.nn.log_softmax(logits[0])
    assert abs(float(lp[0]) - float(ref[2])) < 1e-6
    assert int(rank[0]) == 2
    assert top_ids[0].tolist() == [1, 2]
    np.testing.assert_allclose(top_lp[0], ref[jnp.array([1, 2])], rtol=1e-6)


def test_greedy_argmax_is_argmax_with_first_index_ties():
    """The max-then-min form picks what jnp.argmax picks: the first of equal maxima, rows of -inf
    included (logits with many ties: small integers)."""
    from jaxinfer.sampling import greedy_argmax
    x = np.random.default_rng(0).integers(0, 4, size=(3, 7, 50)).astype(np.float32)
    x[0, 0] = -np.inf
    x[1, 2, 10:] = 9.0
    got = np.asarray(greedy_argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32 and got[1, 2] == 10
