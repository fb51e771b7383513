"""An OpenAI-compatible HTTP server over the engine, as `vllm serve` (standard library only).

    jaxinfer serve [--model DIR] [--port 8000] [engine options]
    curl localhost:8000/v1/completions -d '{"prompt": "def add(a, b):", "max_tokens": 32, "temperature": 0}'

Endpoints: POST /v1/completions and /v1/chat/completions (with "stream": true, server-sent
events ending in `data: [DONE]`), GET /v1/models, /health and /metrics (Prometheus text, vLLM's
metric names under the `jaxinfer:` prefix).

One thread owns the engine (`EngineWorker`): it takes new requests and aborts from a queue
between steps and steps the engine while any request is unfinished; each HTTP handler thread
receives its request's new text through its own queue. Request bodies follow OpenAI's fields,
plus vLLM's extra sampling fields (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, ...). Bad input gets HTTP 400 with OpenAI's error body, naming the value: an
unknown field, an invalid sampling value, a prompt longer than the context or one that could
never fit in the KV memory. A client that disconnects mid-stream has its request aborted (its
pages return to the pool at once), and so has one that leaves while waiting for a whole
(non-streamed) answer; the other requests carry on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling import SamplingParams, is_int
from jaxinfer.structured import StructuredOutputsParams

# Request fields: OpenAI's, then vLLM's extra sampling fields (passed to SamplingParams as they are).
COMMON_FIELDS = ("model", "n", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
                 "presence_penalty", "frequency_penalty", "logit_bias", "user", "response_format")
EXTRA_SAMPLING = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
                  "include_stop_str_in_output", "skip_special_tokens", "allowed_token_ids", "bad_words",
                  "truncate_prompt_tokens")
# vLLM's extra output field: logprobs name tokens "token_id:<id>", since byte-level tokens that are
# parts of one character all decode to U+FFFD and would share one key of top_logprobs
OUTPUT_EXTRA = ("return_tokens_as_token_ids",)
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice"}
COMPLETION_FIELDS = COMMON_FIELDS + EXTRA_SAMPLING + OUTPUT_EXTRA + tuple(GUIDED) + ("prompt", "max_tokens", "logprobs", "echo")
CHAT_FIELDS = COMMON_FIELDS + EXTRA_SAMPLING + OUTPUT_EXTRA + tuple(GUIDED) + (
    "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "chat_template",
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "tools")
MAX_N = 128  # completions per request (OpenAI's limit): n=10**6 was accepted, and the next client timed out at 60 s
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RequestError(ValueError):
    """Bad input of one HTTP request: answered with `status` and OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


# ----------------------------------------------------------------------------- engine thread

@dataclasses.dataclass
class _Submission:
    prompts: list  # engine prompts (text, {"prompt_token_ids": ...}, or {"prompt", "prompt_token_ids"})
    params: SamplingParams
    reply: queue.Queue  # gets (request ids, their output queue) or an exception
    arrival: float  # time.perf_counter() when the HTTP request arrived (the requests' arrival_time)


class EngineWorker:
    """Owns the LLM's engine: one thread adds requests, aborts them and steps the engine.

    `submit` validates and queues a request's prompts (raising ValueError as `add_request`
    does, nothing queued when any prompt is refused) and returns their ids and the queue that
    receives their delta `RequestOutput`s (an Exception there: the engine failed them)."""

    def __init__(self, llm):
        self.llm, self.engine = llm, llm.engine
        self.commands: queue.Queue = queue.Queue()
        self.outputs: dict[str, queue.Queue] = {}  # request id -> its handler's queue
        self.finished = {"stop": 0, "length": 0, "abort": 0}
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.prompt_tokens = self.generation_tokens = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)
        self.thread.start()

    def submit(self, prompts: list, params: SamplingParams,
               arrival: float | None = None) -> tuple[list[str], queue.Queue]:
        reply: queue.Queue = queue.Queue()
        self.commands.put(_Submission(prompts, params, reply, arrival or time.perf_counter()))
        result = self.wait(reply)
        if isinstance(result, Exception):
            raise result
        return result

    def wait(self, q: queue.Queue, gone=None):
        """The next item of q, filled by the engine thread; RuntimeError if that thread is gone;
        None once gone() says the client has left (asked before each wait and every 0.1 s)."""
        while True:
            if gone is not None and gone():
                return None
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the engine thread has stopped") from None

    def call(self, fn):
        """fn() on the engine thread, between steps (nothing else touches the engine meanwhile);
        returns its result or raises its exception. Experiments use it to drive the same engine
        in process."""
        reply: queue.Queue = queue.Queue()
        self.commands.put(("call", fn, reply))
        ok, result = self.wait(reply)
        if not ok:
            raise result
        return result

    def abort(self, request_ids: list[str]):
        self.commands.put(("abort", list(request_ids)))

    def close(self):
        self._stop.set()
        self.commands.put(("wake", None))
        self.thread.join(timeout=30)

    def _run(self):
        while not self._stop.is_set():
            if not self.engine.has_unfinished_requests():
                self._handle(self.commands.get())  # idle: wait for a command
            while True:  # between steps: take whatever has arrived
                try:
                    self._handle(self.commands.get_nowait())
                except queue.Empty:
                    break
            if self.engine.has_unfinished_requests():
                self._step()

    def _fail_all(self, message: str):
        """Abort every request in flight and hand its handler the error (the server goes on)."""
        for rid, q in list(self.outputs.items()):
            self.engine.abort_request(rid)
            q.put(RuntimeError(message))
        self.outputs.clear()

    def _handle(self, command):
        if isinstance(command, _Submission):
            try:  # every prompt is checked before any is queued
                groups = self.llm._make_requests(command.prompts, command.params, arrival_time=command.arrival)
            except Exception as e:  # noqa: BLE001 - handed to the submitting thread
                command.reply.put(e)
                return
            out: queue.Queue = queue.Queue()
            for group in groups:
                self.engine.add_sequences(group)
                self.outputs[group[0].request_id] = out
            command.reply.put(([g[0].request_id for g in groups], out))
        elif command[0] == "call":
            try:
                command[2].put((True, command[1]()))
            except Exception as e:  # noqa: BLE001 - raised again in the calling thread
                command[2].put((False, e))
        elif command[0] == "abort":  # ("wake", None) only ends a wait
            for rid in command[1]:
                if self.outputs.pop(rid, None) is not None:
                    self.engine.abort_request(rid)
                    self.finished["abort"] += 1

    def _step(self):
        try:
            outs = self.engine.step(delta=True)
        except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
            self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
            return
        for out in outs:
            q = self.outputs.get(out.request_id)
            if q is None:
                continue
            self.generation_tokens += sum(len(c.token_ids) for c in out.outputs)
            if out.finished:
                del self.outputs[out.request_id]
                self._record(out)
            q.put(out)

    def _record(self, out: RequestOutput):
        m = out.metrics
        self.prompt_tokens += len(out.prompt_token_ids)
        for c in out.outputs:
            self.finished[c.finish_reason or "abort"] = self.finished.get(c.finish_reason or "abort", 0) + 1
        if m is not None and m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
        if m is not None and m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float):
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{{labels},le="+Inf"}} {self.count}', f"{name}_sum{{{labels}}} {self.sum}",
                      f"{name}_count{{{labels}}} {self.count}"]


# ----------------------------------------------------------------------------- request bodies

def _check_fields(body: dict, allowed: tuple[str, ...]):
    """Unknown fields, and the types of the ones the handlers read before building SamplingParams."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; this endpoint takes {sorted(allowed)}", param=unknown[0])
    for k in ("stream", "echo", "add_generation_prompt", "continue_final_message", "return_tokens_as_token_ids"):
        if body.get(k) is not None and not isinstance(body[k], bool):
            raise RequestError(f"{k}={body[k]!r} must be true or false", param=k)
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise RequestError(f"stream_options={body['stream_options']!r} must be an object", param="stream_options")


def sampling_params(body: dict, max_tokens, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    """SamplingParams from an OpenAI request body (already checked for unknown fields)."""
    kw = {k: body[k] for k in EXTRA_SAMPLING if body.get(k) is not None}
    for k in ("n", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty"):
        if body.get(k) is not None:
            kw[k] = body[k]
    if isinstance(kw.get("n"), int) and kw["n"] > MAX_N:
        raise RequestError(f"n={kw['n']}: at most {MAX_N} completions per request", param="n")
    if body.get("logit_bias") is not None:
        bias = body["logit_bias"]
        if not isinstance(bias, dict):
            raise RequestError(f"logit_bias={bias!r} must be an object of token id -> bias", param="logit_bias")
        try:
            kw["logit_bias"] = {int(t): float(v) for t, v in bias.items()}
        except (TypeError, ValueError):
            raise RequestError(f"logit_bias={bias!r}: keys must be token ids, values numbers",
                               param="logit_bias") from None
    structured = _structured(body)
    if structured is not None:
        kw["structured_outputs"] = structured
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, **kw)
    except (TypeError, ValueError) as e:
        raise RequestError(str(e)) from None


def _structured(body: dict) -> StructuredOutputsParams | None:
    given = {GUIDED[k]: body[k] for k in GUIDED if body.get(k) is not None}
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            given["json_object"] = True
        elif kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if schema is None:
                raise RequestError("response_format json_schema needs json_schema.schema", param="response_format")
            given["json"] = schema
        elif kind != "text":
            raise RequestError(f"response_format={fmt!r}: type must be 'text', 'json_object' or 'json_schema'",
                               param="response_format")
    if not given:
        return None
    if len(given) > 1:
        raise RequestError(f"at most one structured output constraint; got {sorted(given)}")
    try:
        return StructuredOutputsParams(**given)
    except (TypeError, ValueError) as e:
        raise RequestError(str(e)) from None


def completion_prompts(prompt) -> list:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of them."""
    def ids(x):
        return isinstance(x, list) and x and all(is_int(t) for t in x)
    if isinstance(prompt, str):
        return [prompt]
    if ids(prompt):
        return [{"prompt_token_ids": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]
    raise RequestError(f"prompt={prompt!r}: expected a string, a list of strings, a list of token ids or a "
                       "list of such lists (non-empty)", param="prompt")


def _int_field(body: dict, name: str, default=None, low: int = 0):
    value = body.get(name, default)
    if value is not None and (not is_int(value) or value < low):
        raise RequestError(f"{name}={value!r} must be an integer >= {low}", param=name)
    return value


def _choice(i: int, text: str, token_ids, logprobs, reason, chat: bool, delta: bool, top: int, decode=None) -> dict:
    """One entry of a response's (or a stream chunk's) choices."""
    lp = _logprobs(token_ids, logprobs, chat, top, decode) if logprobs else None
    if chat:
        content = {"content": text} if delta else {"role": "assistant", "content": text}
        return {"index": i, ("delta" if delta else "message"): content, "logprobs": lp, "finish_reason": reason}
    return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}


def _after_echo(echo: tuple, text: str, token_ids, logprobs) -> tuple[str, list[int], list | None]:
    """A choice's text, token ids and logprobs with its prompt's echo (`_Handler._prompt_echo`) in front."""
    p_text, p_ids, p_lps = echo
    return p_text + text, p_ids + list(token_ids), (p_lps + (logprobs or []) if p_lps is not None else logprobs)


def token_id_name(t: int) -> str:
    """A token's name in logprobs with return_tokens_as_token_ids."""
    return f"token_id:{t}"


def _logprobs(token_ids, logprobs, chat: bool, top: int, decode=None) -> dict:
    """OpenAI's logprobs of a choice's sampled tokens, with the texts the engine decoded for them:
    chat's `content` list (each with its `top` most likely alternatives), or the completions API's
    tokens / token_logprobs / top_logprobs / text_offset lists (top_logprobs: the top alternatives
    and the sampled token, as vLLM gives them). With echo the lists start with the prompt's tokens,
    whose first position has no logprobs (None), as in OpenAI's and vLLM's answers; `decode` gives
    its text; decode=token_id_name names every token by its id instead."""
    def text(t: int, lp) -> str:
        if decode is not token_id_name and lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return decode(t) if decode is not None else str(t)  # str: no tokenizer

    def entry(t: int, lp) -> dict:
        piece = text(t, lp)
        return {"token": piece, "logprob": lp.logprob, "bytes": list(piece.encode())}
    if chat:
        return {"content": [{**entry(t, pos[t]), "top_logprobs": [
            entry(a, lp) for a, lp in sorted(pos.items(), key=lambda kv: kv[1].rank) if lp.rank <= top]}
            for t, pos in zip(token_ids, logprobs)]}
    pieces = [text(t, pos and pos[t]) for t, pos in zip(token_ids, logprobs)]
    return {"tokens": pieces,
            "token_logprobs": [pos[t].logprob if pos else None for t, pos in zip(token_ids, logprobs)],
            "top_logprobs": [{text(a, lp): lp.logprob for a, lp in pos.items()} if pos else None
                             for pos in logprobs],
            "text_offset": list(itertools.accumulate((len(p) for p in pieces[:-1]), initial=0))}


# ----------------------------------------------------------------------------- HTTP

class OpenAIServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` serving one LLM; `serve_forever()` runs it, `shutdown()` and
    `server_close()` stop it (and the engine thread)."""

    daemon_threads = True
    request_queue_size = 1024  # listen backlog (socketserver's default, 5, resets a burst of connections)

    def __init__(self, llm, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None):
        self.llm = llm
        self.model_name = served_model_name or llm.model_dir.name
        self.worker = EngineWorker(llm)
        self.started = int(time.time())
        super().__init__((host, port), _Handler)

    def server_close(self):
        super().server_close()
        self.worker.close()


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet (the base class logs every request to stderr)
        pass

    # -------------------------------------------------------------- routing

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/health":
            return self._send_json({})
        if path == "/v1/models":
            return self._send_json({"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.started,
                 "owned_by": "jaxinfer", "max_model_len": self.server.llm.max_model_len}]})
        if path == "/metrics":
            return self._send(HTTPStatus.OK, self._metrics().encode(), "text/plain; version=0.0.4")
        self._send_error(RequestError(f"no route GET {path}", HTTPStatus.NOT_FOUND))

    def do_POST(self):
        self._arrival = self._gone_checked = time.perf_counter()
        path = self.path.split("?")[0]
        self._streaming = False
        try:
            body = self._read_json()
            if path == "/v1/completions":
                return self._completions(body)
            if path == "/v1/chat/completions":
                return self._chat(body)
            raise RequestError(f"no route POST {path}", HTTPStatus.NOT_FOUND)
        except RequestError as e:
            self._send_error(e)
        except ValueError as e:  # the engine's validation (prompt too long, can never fit, ...)
            self._send_error(RequestError(str(e)))
        except Exception as e:  # a bug: 500, and the server keeps serving
            if not self._streaming:
                self._send_error(RequestError(f"internal error: {type(e).__name__}: {e}",
                                              HTTPStatus.INTERNAL_SERVER_ERROR))
            raise

    def _read_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.server.model_name:
            raise RequestError(f"The model `{model}` does not exist; this server serves "
                               f"{self.server.model_name!r}", HTTPStatus.NOT_FOUND, "model")
        return body

    # -------------------------------------------------------------- endpoints

    def _completions(self, body: dict):
        _check_fields(body, COMPLETION_FIELDS)
        if "prompt" not in body:
            raise RequestError("missing field 'prompt'", param="prompt")
        echo = bool(body.get("echo"))
        prompts = completion_prompts(body["prompt"])
        logprobs = _int_field(body, "logprobs")
        # echo with max_tokens 0 answers the prompt alone (OpenAI's way to score a text, as
        # lm-evaluation-harness does): the engine still samples one token, which is dropped
        max_tokens = _int_field(body, "max_tokens", 16, 0 if echo else 1)
        params = sampling_params(body, max(max_tokens, 1), logprobs, logprobs if echo else None)
        self._serve_request(body, prompts, params, chat=False, echo=echo, generate=max_tokens > 0)

    def _chat(self, body: dict):
        _check_fields(body, CHAT_FIELDS)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError(f"messages={messages!r}: expected a non-empty list of {{'role', 'content'}} objects",
                               param="messages")
        tok = self.server.llm.get_tokenizer()
        try:
            text = tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True),
                continue_final_message=body.get("continue_final_message", False), tools=body.get("tools"),
                chat_template=body.get("chat_template"), **(body.get("chat_template_kwargs") or {}))
        except (TypeError, ValueError) as e:
            raise RequestError(f"messages: {e}", param="messages") from None
        limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        top = _int_field(body, "top_logprobs", 0) if body.get("logprobs") else None
        params = sampling_params(body, _int_field(body, limit, None, 1), top)
        prompt = {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}
        self._serve_request(body, [prompt], params, chat=True)

    def _serve_request(self, body: dict, prompts: list, params: SamplingParams, chat: bool, echo: bool = False,
                       generate: bool = True):
        ids, out_q = self.server.worker.submit(prompts, params, self._arrival)  # ValueError: 400, nothing queued
        pending = set(ids)
        try:
            self._answer(body, ids, out_q, pending, params, chat, echo, generate)
        finally:  # a client gone, or a failure here: stop what is left of the request now
            if pending:
                self.server.worker.abort(list(pending))

    def _answer(self, body: dict, ids: list[str], out_q: queue.Queue, pending: set, params: SamplingParams,
                chat: bool, echo: bool = False, generate: bool = True):
        """Collect the request's outputs (removing ids from `pending` as they finish) and answer:
        one JSON body, or server-sent events as the text arrives.

        echo: each choice starts with its prompt (text, token ids and, with logprobs, the prompt's
        logprobs), in the first chunk when streamed. generate=False (echo with max_tokens 0): the
        prompt alone; the token the engine sampled is dropped and not counted."""
        top = params.logprobs or 0
        decode = token_id_name if body.get("return_tokens_as_token_ids") else self.server.llm.engine.runner.decode_token
        index = {rid: i for i, rid in enumerate(ids)}
        created, model = int(time.time()), self.server.model_name
        rid0 = ("chatcmpl-" if chat else "cmpl-") + ids[0]
        obj = "chat.completion" if chat else "text_completion"
        n = params.n
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        stream = bool(body.get("stream"))
        texts = [[] for _ in range(len(ids) * n)]
        tokens = [[] for _ in range(len(ids) * n)]
        lps = [[] for _ in range(len(ids) * n)]
        reasons: list[str | None] = [None] * (len(ids) * n)
        echoes: list[tuple | None] = [None] * (len(ids) * n)  # (text, token ids, logprobs) of the prompt
        if stream:
            self._start_stream()
            if chat:
                first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(n)]
                if not self._event({"id": rid0, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "choices": first}):
                    return
        while pending:
            out = self.server.worker.wait(out_q, self._client_gone)
            if out is None:  # the client closed the connection: its requests stop now
                return
            if isinstance(out, Exception):
                if stream:
                    self._event({"error": {"message": str(out), "type": "InternalServerError", "code": 500}})
                    return self._end_stream()
                return self._send_error(RequestError(str(out), HTTPStatus.INTERNAL_SERVER_ERROR))
            choices = []
            for c in out.outputs:
                i = index[out.request_id] * n + c.index
                text, token_ids, logprobs, reason = c.text, c.token_ids, c.logprobs, c.finish_reason
                if not generate:
                    text, token_ids, logprobs = "", [], None
                    reason = reason and "length"
                texts[i].append(text)
                tokens[i] += token_ids
                if logprobs:
                    lps[i] += logprobs
                if reason is not None:
                    reasons[i] = reason
                # the prompt's logprobs are whole once its first token is sampled (a long prompt's
                # outputs arrive after each prefill chunk, with no tokens yet)
                first = echo and echoes[i] is None and bool(c.token_ids or c.finish_reason is not None)
                if first:
                    echoes[i] = self._prompt_echo(out)
                if stream and (text or reason is not None or first):
                    if first:
                        text, token_ids, logprobs = _after_echo(echoes[i], text, token_ids, logprobs)
                    choices.append(_choice(i, text, token_ids, logprobs, reason, chat, True, top, decode))
            if out.finished:
                pending.discard(out.request_id)
                usage["prompt_tokens"] += len(out.prompt_token_ids)
            if stream and choices:
                chunk = {"id": rid0, "object": obj + (".chunk" if chat else ""), "created": created,
                         "model": model, "choices": choices}
                if not self._event(chunk):  # the client went away: its requests stop now
                    return
        usage["completion_tokens"] = sum(map(len, tokens))  # generated tokens only: echo adds the prompt below
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if stream:
            if (body.get("stream_options") or {}).get("include_usage"):
                self._event({"id": rid0, "object": obj + (".chunk" if chat else ""), "created": created,
                             "model": model, "choices": [], "usage": usage})
            self._event_raw(b"data: [DONE]\n\n")
            return self._end_stream()
        whole = [("".join(texts[i]), tokens[i], lps[i] or None) for i in range(len(texts))]
        if echo:
            whole = [_after_echo(e, *w) for e, w in zip(echoes, whole)]
        choices = [_choice(i, text, ids, lp or None, reasons[i], chat, False, top, decode)
                   for i, (text, ids, lp) in enumerate(whole)]
        self._send_json({"id": rid0, "object": obj, "created": created, "model": model, "choices": choices,
                         "usage": usage})

    def _prompt_echo(self, out: RequestOutput) -> tuple[str, list[int], list | None]:
        """What echo puts in front of a choice: the prompt's text (decoded when it came as token
        ids), its token ids and its logprobs (None for the first token), if asked for."""
        text = out.prompt
        if text is None:
            tok = self.server.llm.get_tokenizer()
            text = tok.decode(out.prompt_token_ids) if tok is not None else ""
        # copies: the output holds the request's own lists, which the engine thread owns
        return text, list(out.prompt_token_ids), (list(out.prompt_logprobs) if out.prompt_logprobs else None)

    # -------------------------------------------------------------- metrics

    def _metrics(self) -> str:
        w, s = self.server.worker, self.server.llm.engine.get_stats()
        label = f'model_name="{self.server.model_name}"'
        gauges = {"num_requests_running": s.num_running, "num_requests_waiting": s.num_waiting,
                  "kv_cache_usage_perc": s.kv_usage}
        counters = {"prefix_cache_queries": s.prefix_cache_queries, "prefix_cache_hits": s.prefix_cache_hits,
                    "num_preemptions": s.num_preemptions, "prompt_tokens": w.prompt_tokens,
                    "generation_tokens": w.generation_tokens}
        if self.server.llm.speculative_config is not None:  # vLLM's spec_decode counters
            counters.update(spec_decode_num_drafts=s.spec_steps, spec_decode_num_draft_tokens=s.spec_drafted_tokens,
                            spec_decode_num_accepted_tokens=s.spec_accepted_tokens)
        lines = []
        for name, v in gauges.items():
            lines += [f"# TYPE jaxinfer:{name} gauge", f"jaxinfer:{name}{{{label}}} {v}"]
        for name, v in counters.items():
            lines += [f"# TYPE jaxinfer:{name}_total counter", f"jaxinfer:{name}_total{{{label}}} {v}"]
        lines.append("# TYPE jaxinfer:request_success_total counter")
        lines += [f'jaxinfer:request_success_total{{{label},finished_reason="{r}"}} {c}' for r, c in w.finished.items()]
        for name, h in (("time_to_first_token_seconds", w.ttft), ("e2e_request_latency_seconds", w.e2e)):
            lines += [f"# TYPE jaxinfer:{name} histogram"] + h.lines(f"jaxinfer:{name}", label)
        return "\n".join(lines) + "\n"

    # -------------------------------------------------------------- responses

    def _send(self, status: int, payload: bytes, content_type: str):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True  # the client has gone; nothing to tell it

    def _send_json(self, obj: dict, status: int = HTTPStatus.OK):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _send_error(self, e: RequestError):
        kind = {400: "BadRequestError", 404: "NotFoundError"}.get(int(e.status), "InternalServerError")
        self._send_json({"error": {"message": str(e), "type": kind, "param": e.param, "code": int(e.status)}},
                        e.status)

    def _client_gone(self) -> bool:
        """Whether the client has closed its side (readable with nothing to read), looked at most
        every 0.1 s. A pipelined next request leaves the connection readable with data, which is
        not a departure."""
        now = time.perf_counter()
        if now - self._gone_checked < 0.1:
            return False
        self._gone_checked = now
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _start_stream(self):
        self._streaming = True
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True

    def _event(self, obj: dict) -> bool:
        return self._event_raw(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _event_raw(self, data: bytes) -> bool:
        """Write one server-sent event; False when the client has gone."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            return False

    def _end_stream(self):
        try:
            self.wfile.flush()
        except OSError:
            pass


def serve(llm, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None):
    """Serve `llm` until interrupted."""
    try:
        server = OpenAIServer(llm, host, port, served_model_name)
    except OSError as e:  # port taken, address not local, ...
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    except OverflowError as e:  # a port outside [0, 65535]
        raise ValueError(f"cannot listen on {host}:{port}: {e}") from None
    print(f"jaxinfer: serving {server.model_name!r} on http://{host}:{server.server_address[1]} "
          "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


__all__ = ["EngineWorker", "OpenAIServer", "RequestError", "completion_prompts", "sampling_params", "serve"]
