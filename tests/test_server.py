"""The OpenAI-compatible server: the same tokens as LLM.generate, streamed or not, for concurrent
clients; bad requests answered 400 naming the value while the server keeps serving; a client
that disconnects mid-stream has its request aborted and its pages freed."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from hf_models import load_hf_model, write_tiny, write_tokenizer

from jaxinfer import LLM, SamplingParams
from jaxinfer.server import OpenAIServer

PROMPTS = ["def add(a, b):", "class Point:", "import os", "for i in range(10):"]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server on a free port, and what LLM.generate gave for PROMPTS before it started (the
    server's engine thread owns the engine from then on)."""
    d = tmp_path_factory.mktemp("server_model")
    write_tiny("llama", d, vocab_size=300)
    write_tokenizer(d, 300)
    llm = LLM(str(d), max_num_seqs=8, max_model_len=128, num_kv_pages=40, block_size=8)
    greedy = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
    expected = {p: o.outputs[0] for p, o in zip(PROMPTS, llm.generate(PROMPTS, greedy))}
    chat = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10), chat_template=TEMPLATE)[0].outputs[0]
    server = OpenAIServer(llm, port=0, served_model_name="tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, expected, chat
    server.shutdown()
    server.server_close()


def _post(server, path, body, raw: bytes | None = None):
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    req = urllib.request.Request(url, raw if raw is not None else json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _events(text: str) -> list:
    chunks = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def _idle(server, timeout=60.0):
    """Wait until the engine has nothing left to do; then every page is free or an evictable cached one."""
    engine = server.llm.engine
    end = time.time() + timeout
    while (engine.has_unfinished_requests() or server.worker.outputs) and time.time() < end:
        time.sleep(0.05)
    a = engine.allocator
    return not engine.has_unfinished_requests() and a.num_free == a.num_pages  # free or evictable


def test_completions_match_llm_generate(served):
    server, expected, _ = served
    status, text = _post(server, "/v1/completions", {"model": "tiny", "prompt": PROMPTS, "max_tokens": 12,
                                                     "temperature": 0, "logprobs": 2})
    assert status == 200, text
    body = json.loads(text)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for p, c in zip(PROMPTS, body["choices"]):
        want = expected[p]
        assert c["text"] == want.text and c["finish_reason"] == "length"
        assert c["logprobs"]["token_logprobs"] == pytest.approx(
            [pos[t].logprob for t, pos in zip(want.token_ids, want.logprobs)], abs=1e-5)
        # top alternatives keyed by their text (tokens of this byte-level vocabulary may share one)
        assert len(c["logprobs"]["top_logprobs"]) == 12 and all(top for top in c["logprobs"]["top_logprobs"])
    assert body["usage"]["completion_tokens"] == 4 * 12


def test_stream_carries_the_same_text_and_ends_with_done(served):
    server, expected, _ = served
    status, text = _post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
                                                     "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    events = _events(text)
    pieces = [c["text"] for e in events for c in e["choices"]]
    assert len(pieces) > 1 and "".join(pieces) == expected[PROMPTS[0]].text
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"
    assert events[-1]["usage"] == {"prompt_tokens": events[-1]["usage"]["prompt_tokens"], "completion_tokens": 12,
                                   "total_tokens": events[-1]["usage"]["prompt_tokens"] + 12}


def _concurrent_completions(server) -> dict:
    """PROMPTS sent at once by one client each (every other one streamed): {prompt: text}."""
    results = {}

    def client(p, stream):
        text = _post(server, "/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0,
                                                  "stream": stream})[1]
        results[p] = "".join(c["text"] for e in _events(text) for c in e["choices"]) if stream \
            else json.loads(text)["choices"][0]["text"]

    threads = [threading.Thread(target=client, args=(p, i % 2 == 0)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_concurrent_clients_each_get_their_own_completion(served):
    server, expected, _ = served
    assert _concurrent_completions(server) == {p: expected[p].text for p in PROMPTS}
    assert _idle(server)


def test_a_burst_of_connections_is_served(served):
    """64 clients connect at once (socketserver's default listen backlog of 5 reset some)."""
    server = served[0]
    barrier, codes = threading.Barrier(64), []

    def client():
        barrier.wait()
        code, text = _post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0})
        codes.append((code, json.loads(text)["choices"][0]["text"]))

    threads = [threading.Thread(target=client) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    first_two = json.loads(_post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2,
                                                             "temperature": 0})[1])["choices"][0]["text"]
    assert codes == [(200, first_two)] * 64
    assert _idle(server)


def test_chat_completion_renders_the_template(served):
    server, _, chat = served
    status, text = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10, "temperature": 0,
                                                          "chat_template": TEMPLATE})
    assert status == 200, text
    (choice,) = json.loads(text)["choices"]
    assert choice["message"] == {"role": "assistant", "content": chat.text}
    status, text = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10, "temperature": 0,
                                                          "chat_template": TEMPLATE, "stream": True})
    events = _events(text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["delta"].get("content", "") for e in events for c in e["choices"]) == chat.text


def test_echo_scores_a_text_as_lm_evaluation_harness_asks(served):
    """lm-evaluation-harness's loglikelihood request to an OpenAI server (`local-completions`):
    token ids, echo, max_tokens 1, logprobs 1, temperature 0. It sums token_logprobs[ctxlen:-1]
    and calls a continuation greedy where each token's logprob is the largest of its top_logprobs.
    Both match transformers on the same checkpoint."""
    server = served[0]
    hf = load_hf_model(server.llm.model_dir)
    with torch.no_grad():  # a context, then a greedy continuation of it: greedy and non-greedy positions
        ids = hf.generate(torch.tensor([[1, 17, 42, 99, 7, 230]]), max_new_tokens=5, min_new_tokens=5,
                          do_sample=False)[0].tolist()
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1).numpy()
    status, text = _post(server, "/v1/completions", {"prompt": [ids], "max_tokens": 1, "logprobs": 1,
                                                     "echo": True, "temperature": 0, "seed": 1234})
    assert status == 200, text
    body = json.loads(text)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    np.testing.assert_allclose(lp["token_logprobs"][1:-1], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    assert lp["token_logprobs"][-1] == pytest.approx(ref[-1].max(), abs=1e-4)  # the greedy token after the text
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
    # Tokens that are parts of one UTF-8 character all read U+FFFD, so a top alternative can share
    # the chosen token's key; vLLM's return_tokens_as_token_ids names them by id, and the greedy
    # test is then exact.
    status, text = _post(server, "/v1/completions", {"prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True,
                                                     "temperature": 0, "return_tokens_as_token_ids": True})
    lp = json.loads(text)["choices"][0]["logprobs"]
    assert lp["tokens"][:len(ids)] == [f"token_id:{t}" for t in ids]
    greedy = [t == max(top.values()) for t, top in zip(lp["token_logprobs"][1:-1], lp["top_logprobs"][1:-1])]
    assert greedy == (ref[:-1].argmax(-1) == ids[1:]).tolist() and greedy[-5:] == [True] * 5 and not all(greedy)
    assert all(f"token_id:{t}" in top for t, top in zip(ids[1:], lp["top_logprobs"][1:-1]))
    assert _idle(server)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_logprobs_of_prompts_prefilled_over_several_steps(served, stream):
    """With 32 tokens of prefill a step, each 100-token prompt takes several steps, and the engine
    sends a request's (empty) outputs before its prompt is done; each choice still echoes its
    whole prompt's logprobs, as transformers computes them (lm-evaluation-harness's contexts are
    hundreds of tokens long)."""
    model_dir = served[0].llm.model_dir
    server = OpenAIServer(LLM(str(model_dir), max_num_seqs=4, max_model_len=128, num_kv_pages=64, block_size=8,
                              max_num_batched_tokens=32), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rng = np.random.default_rng(3)
    prompts = [[1] + rng.integers(3, 300, size=99).tolist() for _ in range(6)]
    with torch.no_grad():
        ref = load_hf_model(model_dir)(torch.tensor(prompts)).logits.log_softmax(-1).numpy()
    try:
        status, text = _post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 1, "logprobs": 1,
                                                         "echo": True, "temperature": 0, "stream": stream})
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200, text
    choices = [c for e in _events(text) for c in e["choices"]] if stream else json.loads(text)["choices"]
    got = {i: [] for i in range(len(prompts))}
    for c in choices:
        got[c["index"]] += c["logprobs"]["token_logprobs"]
    for i, (p, r) in enumerate(zip(prompts, ref)):
        assert len(got[i]) == len(p) + 1
        np.testing.assert_allclose(got[i][1:-1], r[np.arange(len(p) - 1), p[1:]], atol=1e-4)


def test_echo_puts_the_prompt_first_streamed_or_not(served):
    server, expected, _ = served
    p = PROMPTS[0]
    body = {"prompt": p, "max_tokens": 12, "temperature": 0, "echo": True}
    (choice,) = json.loads(_post(server, "/v1/completions", body)[1])["choices"]
    assert choice["text"] == p + expected[p].text and choice["logprobs"] is None
    pieces = [c["text"] for e in _events(_post(server, "/v1/completions", {**body, "stream": True})[1])
              for c in e["choices"]]
    assert pieces[0].startswith(p) and "".join(pieces) == p + expected[p].text
    # max_tokens 0: the prompt alone, with its logprobs; nothing generated is returned or counted
    for stream in (False, True):
        status, text = _post(server, "/v1/completions", {"prompt": [p, p], "max_tokens": 0, "echo": True,
                                                         "logprobs": 0, "stream": stream})
        assert status == 200, text
        choices = [c for e in _events(text) for c in e["choices"]] if stream else json.loads(text)["choices"]
        assert [c["text"] for c in choices] == [p, p] and {c["finish_reason"] for c in choices} == {"length"}
        n_prompt = len(choices[0]["logprobs"]["tokens"])
        assert choices[0]["logprobs"]["token_logprobs"][0] is None and n_prompt > 1
        if not stream:
            assert json.loads(text)["usage"] == {"prompt_tokens": 2 * n_prompt, "completion_tokens": 0,
                                                 "total_tokens": 2 * n_prompt}
    assert _idle(server)


@pytest.mark.parametrize("body,status,match", [
    ({"prompt": "x", "temperature": -1}, 400, "temperature=-1"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens=0"),  # 0 only with echo
    ({"prompt": "x", "max_tokens": -1, "echo": True}, 400, "max_tokens=-1 must be an integer >= 0"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of"),
    ({"prompt": "x " * 200, "max_tokens": 4}, 400, "max_model_len=128"),
    ({"prompt": []}, 400, "prompt=[]"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream='yes' must be true or false"),
    ({"prompt": "x", "stream_options": "usage"}, 400, "stream_options='usage' must be an object"),
    ({"prompt": "x", "ignore_eos": 1}, 400, "ignore_eos=1: must be True or False"),
    ({"prompt": "x", "n": 10**6}, 400, "n=1000000: at most 128 completions per request"),  # was accepted
    (None, 400, "not JSON"),
])
def test_bad_requests_are_refused_naming_the_value_and_serving_goes_on(served, body, status, match):
    server, expected, _ = served
    code, text = _post(server, "/v1/completions", body, raw=b"{nope" if body is None else None)
    assert code == status
    assert match in json.loads(text)["error"]["message"]
    code, text = _post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0})
    assert code == 200 and json.loads(text)["choices"][0]["text"] == expected[PROMPTS[1]].text
    assert _idle(server)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_has_its_request_aborted(served, stream, monkeypatch):
    server = served[0]
    assert _idle(server)
    engine, real_step = server.llm.engine, server.llm.engine.step

    def slow_step(delta=False):
        # The tiny model would finish 120 tokens before the client is seen to leave. At 10 ms a step the
        # request could still finish first on a loaded machine (once in a full suite run): 50 ms gives the
        # handler 6 s to see the departure, which it does within ~0.1 s; the test takes no longer.
        time.sleep(0.05)
        return real_step(delta)

    monkeypatch.setattr(engine, "step", slow_step)
    aborted = server.worker.finished["abort"]
    body = json.dumps({"prompt": PROMPTS[2], "max_tokens": 120, "temperature": 0, "ignore_eos": True,
                       "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    if stream:
        received = b""
        while b"data: " not in received:  # the first token has been generated
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
    else:
        end = time.time() + 60
        while not server.worker.outputs and time.time() < end:  # the request is in the engine
            time.sleep(0.005)
    sock.close()  # the client goes away
    assert _idle(server)  # aborted before its 120 tokens, its pages back in the pool
    assert server.worker.finished["abort"] == aborted + 1


def test_models_health_and_metrics(served):
    server, _, _ = served
    port = server.server_address[1]
    assert _idle(server)
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 128
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200
    before = server.worker.generation_tokens
    _post(server, "/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values['jaxinfer:generation_tokens_total{model_name="tiny"}'] == before + 5
    assert values['jaxinfer:num_requests_running{model_name="tiny"}'] == 0
    assert values['jaxinfer:request_success_total{model_name="tiny",finished_reason="length"}'] >= 1
    count = values['jaxinfer:time_to_first_token_seconds_count{model_name="tiny"}']
    assert count >= 1 and values['jaxinfer:time_to_first_token_seconds_bucket{model_name="tiny",le="+Inf"}'] == count
    assert not any("spec_decode" in k for k in values)  # no speculation, no such counters


def test_speculative_server_matches_llm_and_counts_drafts(tmp_path):
    """A server over an engine that speculates (n-gram) answers what LLM.generate does and
    reports vLLM's spec_decode counters, equal to the engine's stats."""
    write_tiny("llama", tmp_path, vocab_size=300)
    write_tokenizer(tmp_path, 300)
    llm = LLM(str(tmp_path), max_num_seqs=4, max_model_len=128, block_size=8,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    prompt = {"prompt": "a b c a b c a b c a b", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    want = llm.generate(prompt["prompt"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    server = OpenAIServer(llm, port=0, served_model_name="tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, text = _post(server, "/v1/completions", prompt)
        assert code == 200 and json.loads(text)["choices"][0]["text"] == want[0].outputs[0].text
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics").read().decode()
    finally:
        server.shutdown()
        server.server_close()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    s = llm.get_stats()
    assert s.spec_steps > 0
    assert values['jaxinfer:spec_decode_num_drafts_total{model_name="tiny"}'] == s.spec_steps
    assert values['jaxinfer:spec_decode_num_draft_tokens_total{model_name="tiny"}'] == s.spec_drafted_tokens
    assert values['jaxinfer:spec_decode_num_accepted_tokens_total{model_name="tiny"}'] == s.spec_accepted_tokens


def test_async_scheduling_server_answers_concurrent_clients_as_llm_generate(tmp_path):
    """With async_scheduling the engine thread returns each step's tokens a step later; concurrent
    clients, streamed or not, still get what LLM.generate gives, and every page comes back."""
    write_tiny("llama", tmp_path, vocab_size=300)
    write_tokenizer(tmp_path, 300)
    llm = LLM(str(tmp_path), max_num_seqs=4, max_model_len=128, num_kv_pages=40, block_size=8, async_scheduling=True)
    want = {p: o.outputs[0].text for p, o in zip(PROMPTS, llm.generate(PROMPTS, SamplingParams(temperature=0,
                                                                                               max_tokens=12)))}
    server = OpenAIServer(llm, port=0, served_model_name="tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _concurrent_completions(server) == want
        assert _idle(server)
    finally:
        server.shutdown()
        server.server_close()


def test_a_failed_engine_step_answers_500_and_the_next_request_is_served(served, monkeypatch):
    server, expected, _ = served
    assert _idle(server)
    engine, calls = server.llm.engine, []
    real_step = engine.step

    def failing_step(delta=False):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real_step(delta)

    monkeypatch.setattr(engine, "step", failing_step)
    code, text = _post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0})
    assert code == 500 and "device lost" in json.loads(text)["error"]["message"]
    assert _idle(server)  # the failed request was aborted, its pages freed
    code, text = _post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0})
    assert code == 200 and json.loads(text)["choices"][0]["text"] == expected[PROMPTS[0]].text
