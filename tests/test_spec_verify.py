"""Speculative verification: the acceptance rule is lossless and accepts as often as theory says.

Statistical tests run the pure verify functions on small fixed distributions with fixed
seeds; each chi-square is compared with its critical value at significance 0.001.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.sampling import SamplingParams, SamplingTensors, row_limits
from jaxinfer.spec.verify import accept_greedy, accept_sampled, draft_sample, verify

# chi-square critical values at p = 0.001 for the degrees of freedom used below
CHI2_CRIT = {5: 20.52, 15: 37.70}


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_accept_greedy_leading_run_and_correction():
    v = 5
    # argmax of p at the 4 positions: 1, 2, 3, 4
    p = jax.nn.one_hot(jnp.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]), v) * 3.0
    draft = jnp.array([[1, 2, 3], [1, 0, 3], [0, 2, 3]])
    n_acc, nxt = accept_greedy(p, draft)
    assert n_acc.tolist() == [3, 1, 0]  # all / a run of one / none
    assert nxt.tolist() == [4, 2, 1]  # bonus; argmax p_2, argmax p_1 as corrections


@pytest.fixture(scope="module")
def pq():
    p = np.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    q = np.array([0.1, 0.3, 0.1, 0.3, 0.05, 0.15])
    return p, q


def _run_sampled(p, q, k, n, seed, one_hot_draft=None):
    kd, ku, kr = jax.random.split(jax.random.PRNGKey(seed), 3)
    v = len(p)
    if one_hot_draft is None:
        draft = jax.random.categorical(kd, jnp.log(jnp.asarray(q)), shape=(n, k)).astype(jnp.int32)
        q_arr = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n, k, v))
    else:
        draft = jnp.full((n, k), one_hot_draft, jnp.int32)
        q_arr = None
    p_arr = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, k + 1, v))
    u = jax.random.uniform(ku, (n, k))
    keys = jax.random.key_data(jax.random.split(kr, n * (k + 1))).reshape(n, k + 1, 2)
    n_acc, nxt = jax.jit(accept_sampled)(p_arr, q_arr, draft, u, keys)
    n_acc, nxt, draft = map(np.asarray, (n_acc, nxt, draft))
    first = np.where(n_acc > 0, draft[:, 0], nxt)  # the first emitted token of every round
    return n_acc, nxt, first


def test_sampled_first_token_follows_p_and_tau_matches_closed_form(pq):
    p, q = pq
    k, n = 4, 200_000
    n_acc, nxt, first = _run_sampled(p, q, k, n, seed=0)
    assert chi_square(np.bincount(first, minlength=len(p)), p) < CHI2_CRIT[5]
    # The corrected / bonus token alone also has law p when all k were accepted (bonus from p_{k+1}).
    bonus = nxt[n_acc == k]
    assert chi_square(np.bincount(bonus, minlength=len(p)), p) < CHI2_CRIT[5]
    # Leviathan et al.: alpha = sum min(p, q); E[tokens per round] = (1 - alpha^(k+1)) / (1 - alpha).
    alpha = np.minimum(p, q).sum()
    tau = (1 - alpha ** (k + 1)) / (1 - alpha)
    tokens = n_acc + 1
    se = tokens.std() / np.sqrt(n)
    assert abs(tokens.mean() - tau) < 4 * se, (tokens.mean(), tau)
    # P(n_acc >= i) = alpha^i
    for i in range(1, k + 1):
        assert abs((n_acc >= i).mean() - alpha ** i) < 0.005


@pytest.mark.parametrize("token", [1, -1])
def test_one_hot_draft_is_lossless(pq, token):
    p, _ = pq
    n_acc, _, first = _run_sampled(p, None, 3, 100_000, seed=1, one_hot_draft=token)
    assert chi_square(np.bincount(first, minlength=len(p)), p) < CHI2_CRIT[5]
    if token >= 0:  # one-hot q at the token: alpha = p(token), accepted while the target draws it
        assert abs((n_acc >= 1).mean() - p[token]) < 0.005
    else:  # -1: no proposal, never accepted; the residual is p itself
        assert (n_acc == 0).all()


def test_identical_draft_accepts_everything(pq):
    p, _ = pq
    n_acc, _, first = _run_sampled(p, p, 3, 20_000, seed=2)
    assert (n_acc == 3).all()


def test_markov_chain_with_temperature_and_top_k_through_verify():
    """Multi-round decoding of a Markov chain (target P, draft Q, both shaped by T=0.8, top-k=3):
    the emitted tokens at fixed output positions follow the target chain's joint law."""
    v, k, n, rounds = 4, 3, 20_000, 3
    rng = np.random.default_rng(0)
    lp = jnp.asarray(rng.normal(size=(v, v)) * 1.5, jnp.float32)  # target logits given the previous token
    lq = jnp.asarray(rng.normal(size=(v, v)) * 1.5, jnp.float32)  # draft logits given the previous token
    params = SamplingParams(temperature=0.8, top_k=3)
    st = SamplingTensors.from_params([params] * n, list(range(n)), v)
    limits = row_limits([100] * n, [0] * n, [[]] * n, v)

    @jax.jit
    def one_round(last, g):
        toks, qs, prev = [], [], last
        for i in range(k):  # the draft chain
            tok, q = draft_sample(lq[prev], st, limits, g + i)
            toks.append(tok)
            qs.append(q)
            prev = tok
        draft = jnp.stack(toks, 1)  # [n, k]
        target_logits = lp[jnp.concatenate([last[:, None], draft], 1)]  # [n, k+1, V]
        n_acc, nxt, _ = verify(target_logits, draft, jnp.stack(qs, 1), st, limits, g)
        i = jnp.arange(k + 1)[None, :]
        emitted = jnp.where(i < n_acc[:, None], jnp.concatenate([draft, draft[:, :1]], 1), nxt[:, None])
        return emitted, n_acc + 1

    last = jnp.zeros((n,), jnp.int32)
    g = jnp.zeros((n,), jnp.int32)
    out = np.full((n, rounds * (k + 1)), -1)
    filled = np.zeros(n, int)
    for _ in range(rounds):
        emitted, n_emit = map(np.asarray, one_round(last, g))
        rows, cols = np.nonzero(np.arange(k + 1)[None, :] < n_emit[:, None])
        out[rows, filled[rows] + cols] = emitted[rows, cols]
        filled += n_emit
        last = jnp.asarray(emitted[np.arange(n), n_emit - 1])
        g = g + jnp.asarray(n_emit)
    assert filled.min() >= 3

    # Exact law of the shaped target chain from x_0 = 0.
    shaped = np.asarray(jax.nn.softmax(jnp.where(lp / 0.8 < jnp.sort(lp / 0.8, axis=-1)[:, -3:-2], -jnp.inf,
                                                 lp / 0.8), axis=-1))  # top-3 at T = 0.8
    x1 = shaped[0]
    x2 = x1 @ shaped
    joint = (x2[:, None] * shaped).reshape(-1)  # P(x_2 = a, x_3 = b): output positions 1 and 2
    pairs = out[:, 1] * v + out[:, 2]
    assert chi_square(np.bincount(pairs, minlength=v * v).astype(float), joint) < CHI2_CRIT[15]
    assert chi_square(np.bincount(out[:, 0], minlength=v).astype(float), x1) < 16.27  # dof 3


def test_keys_depend_only_on_row_seed_and_output_index():
    """A row's draws do not change when its batch-mates change (reproducible seeded requests)."""
    v, k = 8, 3
    lp = jax.random.normal(jax.random.PRNGKey(0), (2, k + 1, v))
    lq = jax.random.normal(jax.random.PRNGKey(1), (2, k, v))
    draft = jnp.array([[1, 2, 3], [1, 2, 3]])
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9)]
    limits = row_limits([50, 50], [0, 0], [[], []], v)
    a = verify(lp, draft, lq, SamplingTensors.from_params(params, [7, 8], v), limits, jnp.array([5, 5]))
    params_b = [params[0], SamplingParams(temperature=0.0)]
    b = verify(lp, draft, lq, SamplingTensors.from_params(params_b, [7, 9], v), limits, jnp.array([5, 0]))
    assert int(a[0][0]) == int(b[0][0]) and int(a[1][0]) == int(b[1][0])


@pytest.mark.parametrize("min_tokens,expect_stop_allowed", [(0, True), (10, False)])
def test_stop_token_blocked_before_min_tokens(min_tokens, expect_stop_allowed):
    v, stop = 6, 2
    logits = jnp.zeros((1, 3, v)).at[:, :, stop].set(5.0)  # the target wants to stop everywhere
    draft = jnp.array([[stop, stop]])
    st = SamplingTensors.from_params([SamplingParams(temperature=0.0)], [0], v)
    limits = row_limits([50], [min_tokens], [[stop]], v)
    n_acc, nxt, _ = verify(logits, draft, None, st, limits, jnp.array([1]))
    if expect_stop_allowed:
        assert int(n_acc[0]) == 2 and int(nxt[0]) == stop
    else:
        assert int(n_acc[0]) == 0 and int(nxt[0]) != stop


def test_penalized_chain_through_verify_follows_the_penalized_target():
    """Sampling with presence / frequency / repetition penalties and a logit bias: the drafts'
    q is penalized with the counts at the start of each round only, the target's p_i counts
    the drafts before position i. Emitted tokens at output positions 0 and 1 follow the
    joint law of plain penalized sampling (which is not a Markov chain: it depends on
    every earlier token)."""
    from jaxinfer.sampling import PenaltyInputs

    v, k, n, rounds = 4, 3, 20_000, 2
    rng = np.random.default_rng(1)
    lp = jnp.asarray(rng.normal(size=(v, v)) * 1.5, jnp.float32)
    lq = jnp.asarray(rng.normal(size=(v, v)) * 1.5, jnp.float32)
    params = SamplingParams(temperature=1.0, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.6,
                            logit_bias={3: 0.8})
    st = SamplingTensors.from_params([params] * n, list(range(n)), v)
    limits = row_limits([100] * n, [0] * n, [[]] * n, v)
    prompt = [1]  # x_0; outputs start after it
    pen0 = PenaltyInputs.from_rows([params] * n, [prompt] * n, [[]] * n, v).build(v)

    @jax.jit
    def one_round(last, g, pen):
        toks, qs, prev = [], [], last
        for i in range(k):
            tok, q = draft_sample(lq[prev], st, limits, g + i, pen=pen)
            toks.append(tok)
            qs.append(q)
            prev = tok
        draft = jnp.stack(toks, 1)
        target_logits = lp[jnp.concatenate([last[:, None], draft], 1)]
        n_acc, nxt, _ = verify(target_logits, draft, jnp.stack(qs, 1), st, limits, g, pen=pen)
        i = jnp.arange(k + 1)[None, :]
        emitted = jnp.where(i < n_acc[:, None], jnp.concatenate([draft, draft[:, :1]], 1), nxt[:, None])
        return emitted, n_acc + 1, pen.record(emitted, i < (n_acc + 1)[:, None])

    last, g, pen = jnp.full((n,), prompt[0], jnp.int32), jnp.zeros((n,), jnp.int32), pen0
    out = np.full((n, rounds * (k + 1)), -1)
    filled = np.zeros(n, int)
    for _ in range(rounds):
        emitted, n_emit, pen = one_round(last, g, pen)
        emitted, n_emit = np.asarray(emitted), np.asarray(n_emit)
        rows, cols = np.nonzero(np.arange(k + 1)[None, :] < n_emit[:, None])
        out[rows, filled[rows] + cols] = emitted[rows, cols]
        filled += n_emit
        last, g = jnp.asarray(emitted[np.arange(n), n_emit - 1]), g + jnp.asarray(n_emit)
    assert filled.min() >= 2

    def law(prev, generated):
        """Plain sampling's distribution of the next token after `generated` (vLLM's order:
        repetition penalty on seen tokens, then frequency and presence, then the bias)."""
        x = np.asarray(lp[prev], np.float64).copy()
        counts = np.bincount(generated, minlength=v)
        seen = (counts > 0) | np.isin(np.arange(v), prompt)
        x[seen] = np.where(x[seen] > 0, x[seen] / 1.6, x[seen] * 1.6)
        x = x - 0.4 * counts - 0.7 * (counts > 0)
        x[3] += 0.8
        e = np.exp(x - x.max())
        return e / e.sum()

    x1 = law(prompt[0], [])
    joint = np.array([[x1[a] * law(a, [a])[b] for b in range(v)] for a in range(v)]).reshape(-1)
    pairs = out[:, 0] * v + out[:, 1]
    assert chi_square(np.bincount(pairs, minlength=v * v).astype(float), joint) < CHI2_CRIT[15]
    # The penalties matter here: the unpenalized chain's law is far from the samples.
    plain = np.asarray(jax.nn.softmax(lp, axis=-1), np.float64)
    unpenalized = (plain[prompt[0]][:, None] * plain).reshape(-1)
    assert chi_square(np.bincount(pairs, minlength=v * v).astype(float), unpenalized) > 10 * CHI2_CRIT[15]
