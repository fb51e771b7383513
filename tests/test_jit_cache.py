"""Persistent compilation cache: a second process loads what the first compiled."""

import json
import os
import subprocess
import sys

import pytest
from hf_models import write_tiny, write_tokenizer

from jaxinfer.jit_cache import ENV_VAR, default_dir, enable_compilation_cache

CHILD = """
import json, sys
import jax
from jax import monitoring
events = {"hits": 0}
def on_event(name, **kw):
    if name == "/jax/compilation_cache/cache_hits":
        events["hits"] += 1
monitoring.register_event_listener(on_event)
from jaxinfer import LLM, SamplingParams
llm = LLM(sys.argv[1], compilation_cache_dir=sys.argv[2])
out = llm.generate([{"prompt_token_ids": [5, 9, 11, 3]}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
print(json.dumps({"hits": events["hits"], "tokens": out[0].outputs[0].token_ids}))
"""


def _run(model_dir, cache_dir) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(cache_dir)], capture_output=True, check=False,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_second_process_loads_compiled_programs(tmp_path):
    model = write_tiny("llama", tmp_path / "m", vocab_size=300, max_position_embeddings=128)
    cache = tmp_path / "xla"
    first = _run(model, cache)
    entries = {p.name for p in cache.iterdir()}
    second = _run(model, cache)
    assert first["hits"] == 0 and entries  # compiled, and written to the directory
    assert second["hits"] >= 1  # the engine's programs come from disk
    assert second["tokens"] == first["tokens"]


def test_cache_directory_errors_and_environment(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="compilation_cache_dir=.*not a writable directory"):
        enable_compilation_cache(blocker / "sub")
    monkeypatch.setenv(ENV_VAR, "0")
    assert default_dir() is None and enable_compilation_cache() is None
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "c"))
    assert default_dir() == tmp_path / "c"
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "jaxinfer" / "xla"


def test_cli_runs_without_a_writable_default_cache(tmp_path):
    """The quickstart must work where the home cache cannot be written; an explicit bad
    --compilation-cache is an error. Each run is its own process, as the quickstart's is (the CLI
    turns the persistent cache on for the whole process)."""
    model = write_tiny("llama", tmp_path / "m", vocab_size=300, max_position_embeddings=128)
    write_tokenizer(model, 300)
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["XDG_CACHE_HOME"] = str(blocker)  # default dir under a file: not creatable

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jaxinfer.cli", "generate", *args, "--model", str(model)],
                              capture_output=True, text=True, env=env, timeout=600)

    ok = cli("def f(", "--max-tokens", "2")
    assert ok.returncode == 0 and "error" not in ok.stderr, ok.stderr[-2000:]
    bad = cli("x", "--compilation-cache", str(blocker / "c"))
    assert bad.returncode == 2 and "compilation_cache_dir=" in bad.stderr


MAPPINGS_CHILD = """
import gc, json, warnings
import jax
import jax.numpy as jnp
from jaxinfer.jit_cache import memory_mappings, warn_if_near_mapping_limit
held, limit = memory_mappings()
fns = [jax.jit(lambda x, i=i: jnp.tanh(x * i) + jnp.cos(x).sum()) for i in range(30)]
for i, f in enumerate(fns):
    f(jnp.ones((4 + i,))).block_until_ready()
grown = memory_mappings()[0]
del fns
gc.collect()
jax.clear_caches()
cleared = memory_mappings()[0]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    warned = warn_if_near_mapping_limit(0.0)
print(json.dumps({"held": held, "limit": limit, "grown": grown, "cleared": cleared, "warned": warned,
                  "message": str(caught[0].message) if caught else "",
                  "category": caught[0].category.__name__ if caught else "",
                  "warned_at_default": warn_if_near_mapping_limit()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_compiled_programs_hold_memory_mappings_until_the_caches_let_go():
    """What a long sweep runs out of (see conftest): the count rises with each compiled program,
    falls when jax's caches are cleared, and LLM warns before the limit is near. In a fresh
    process: clearing a test worker's caches frees every program the suite compiled before
    (~0.3 ms per mapping, ~9 s late in a run)."""
    res = subprocess.run([sys.executable, "-c", MAPPINGS_CHILD], capture_output=True, check=False, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 < r["held"] < r["limit"]
    assert r["grown"] >= r["held"] + 30  # at least one mapping per program
    assert r["cleared"] < r["grown"] - 30
    assert r["warned"] and "jax.clear_caches()" in r["message"] and r["category"] == "ResourceWarning"
    assert not r["warned_at_default"]
