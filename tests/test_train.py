"""Training pipeline: corpus split, tokenizer, loss decrease, bit-exact resume (tiny and fast)."""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import corpus, train
from jaxinfer.config import ModelConfig
from jaxinfer.model import init_weights

TRAIN_FILES = ("bisect.py", "colorsys.py", "heapq.py", "textwrap.py", "keyword.py", "shlex.py")
HELDOUT_FILES = ("json/__init__.py", "json/decoder.py")


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    """A few real stdlib files (train + one held-out package), plus files that must be excluded."""
    src, root = corpus.stdlib_root(), tmp_path_factory.mktemp("stdlib")
    for rel in TRAIN_FILES + HELDOUT_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, root / rel)
    for rel in ("pkg/tests/test_x.py", "pkg/test/helper.py", "idlelib/idle_test/a.py",
                "site-packages/lib.py", "pydoc_data/topics.py", "test_top.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    return root


@pytest.fixture(scope="module")
def mini_data(mini_root, tmp_path_factory):
    return corpus.build_corpus(tmp_path_factory.mktemp("work"), vocab_size=512, root=mini_root,
                               heldout=("json",), verbose=False)


def tiny_cfg(vocab: int) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=32,
                       intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
                       eos_token_ids=(2,))


def test_stdlib_split_is_deterministic_and_disjoint():
    files = corpus.corpus_files()
    assert files == corpus.corpus_files()
    assert files == sorted(files, key=lambda p: p.as_posix())
    train_files, held = corpus.split_files(files)
    assert train_files and held
    assert {corpus.package_of(f) for f in held} == set(corpus.HELDOUT_PACKAGES)
    assert not {corpus.package_of(f) for f in train_files} & set(corpus.HELDOUT_PACKAGES)
    for f in files:
        assert "site-packages" not in f.parts
        assert not any(p in ("test", "tests", "idle_test") for p in f.parts), f


def test_parsed_files_gives_a_split_and_skips_files_that_do_not_read_or_parse(tmp_path):
    for rel, data in (("a.py", b"x = 1\n"), ("bad.py", b"def (:\n"), ("latin.py", b"s = '\xe9'\n"),
                      ("json/b.py", b"y = 2\n")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    train_split = [(f.as_posix(), text) for f, text, _ in corpus.parsed_files("train", tmp_path, ("json",))]
    held = [(f.as_posix(), tree.body[0].targets[0].id) for f, _, tree in
            corpus.parsed_files("heldout", tmp_path, ("json",))]
    assert train_split == [("a.py", "x = 1\n")]
    assert held == [("json/b.py", "y")]
    with pytest.raises(ValueError, match="split='test'"):
        next(corpus.parsed_files("test", tmp_path))


def test_mini_corpus_excludes_tests_and_tokenizes(mini_root, mini_data):
    names = [f.as_posix() for f in corpus.corpus_files(mini_root)]
    assert names == sorted(TRAIN_FILES + HELDOUT_FILES)
    assert mini_data.heldout_files == list(HELDOUT_FILES)
    assert not set(mini_data.train_files) & set(mini_data.heldout_files)
    tok = mini_data.tokenizer()
    assert [tok.token_to_id(s) for s in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    text = "def __init__(self, x):\n        self.x = x\n"
    ids = tok.encode(text).ids
    assert ids[0] == corpus.BOS and tok.decode(ids) == text
    # Documents are <s> ... </s> runs.
    assert mini_data.train[0] == corpus.BOS and mini_data.train[-1] == corpus.EOS
    assert (mini_data.heldout[mini_data.heldout_doc_starts] == corpus.BOS).all()
    prompts = corpus.heldout_prompts(tok, num=4, prompt_tokens=8, root=mini_root, heldout=("json",))
    assert len(prompts) == 4 and all(p.source.startswith("json/") for p in prompts)
    assert all(p.text.lstrip().startswith(("def ", "class ", "async def ")) for p in prompts)


def test_batcher_is_a_function_of_the_step(mini_data):
    a = train.TokenBatcher(mini_data.train, 4, 32, seed=3)
    b = train.TokenBatcher(mini_data.train, 4, 32, seed=3)
    steps = [0, 5, a.per_epoch // 4 + 2, 1]
    for s in steps:  # out of order, across an epoch boundary
        np.testing.assert_array_equal(a.batch(s), b.batch(s))
    assert a.batch(0).shape == (4, 33)
    assert not np.array_equal(a.batch(0), a.batch(1))


def _run(cfg, data, workdir, steps, stop_at=None):
    tc = train.TrainConfig(steps=steps, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=0,
                           ckpt_every=100, seed=0)
    batcher = train.PhasedBatcher([(steps - 2, train.TokenBatcher(data.train, 4, 32, seed=0)),
                                   (steps, train.TokenBatcher(data.train, 2, 64, seed=1))])
    params = init_weights(cfg, jax.random.PRNGKey(0))
    return train.train(train.lm_loss_fn(cfg), params, tc, batcher, workdir=workdir, stop_at=stop_at,
                       progress=False)


def test_loss_decreases_and_resume_is_bit_exact(mini_data, tmp_path):
    cfg = tiny_cfg(512)
    steps = 10
    loss_fn = jax.jit(train.lm_loss_fn(cfg))
    probe = jnp.asarray(train.TokenBatcher(mini_data.train, 8, 32, seed=9).batch(0))
    init_loss = float(loss_fn(init_weights(cfg, jax.random.PRNGKey(0)), probe)[0])

    full, summary = _run(cfg, mini_data, tmp_path / "full", steps)
    assert summary["end_step"] == steps and summary["resumed_from"] is None
    assert float(loss_fn(full.params, probe)[0]) < init_loss - 0.2

    part, s1 = _run(cfg, mini_data, tmp_path / "split", steps, stop_at=4)
    assert s1["end_step"] == 4
    resumed, s2 = _run(cfg, mini_data, tmp_path / "split", steps)
    assert s2["resumed_from"] == 4 and s2["end_step"] == steps
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_distillation_loss_is_zero_against_itself():
    cfg = tiny_cfg(64)
    w = init_weights(cfg, jax.random.PRNGKey(1))
    batch = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, 64)
    loss, aux = train.lm_loss_fn(cfg, (cfg, w), distill_weight=1.0)(w, batch, w)
    assert abs(float(aux["kl"])) < 1e-6 and abs(float(loss)) < 1e-6
    logits = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 64))
    targets = jnp.array([[1, 2, 3], [4, 5, 6]])
    ref = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    np.testing.assert_allclose(float(train.cross_entropy(logits, targets)), float(ref), rtol=1e-6)
