"""LLM: the offline entry point, following vLLM's `LLM` / `SamplingParams` API."""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax

from jaxinfer.beam import BeamSearchOutput, BeamSearchParams, run_beam_search
from jaxinfer.checkpoint import (DTYPES, CheckpointError, export_hf, hf_quantization, is_orbax_dir,
                                 load_hf, orbax_quantization, restore_orbax, save_orbax)
from jaxinfer.config import MOE_IMPLS
from jaxinfer.engine.engine import EngineConfig, LLMEngine
from jaxinfer.engine.request import EngineRequest, Status
from jaxinfer.jit_cache import enable_compilation_cache, warn_if_near_mapping_limit
from jaxinfer.layers import ATTENTION_BACKENDS, resolve_backend
from jaxinfer.lora import LoRAConfig, LoRARequest
from jaxinfer.model import WEIGHT_LAYOUTS, runtime_layout
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling import SamplingParams, is_int, is_list_like
from jaxinfer.static_batch import StaticBatchGenerator
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.wquant import WeightQuantConfig, quantize_weights

ASSETS = Path(__file__).parent / "assets" / "models"
DEFAULT_MODEL = "stdlib-target"


def embedded_models() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file()) if ASSETS.is_dir() else []


def resolve_model(model: str | None) -> Path:
    """A model directory from a path or the name of an embedded model."""
    name = model or DEFAULT_MODEL
    embedded = ASSETS / name
    if (embedded / "config.json").is_file():
        return embedded
    path = Path(name).expanduser()
    if path.exists():
        return path
    raise CheckpointError(f"model {name!r}: no such directory, and not an embedded model "
                          f"(embedded: {', '.join(embedded_models()) or 'none'})")


def default_dtype(requested: str) -> str:
    """'auto' is float32 on CPU and bfloat16 on accelerators. On CPU float32 is the precise reference
    (it matches transformers within 1e-4) and costs little there: decode is bound by XLA:CPU's dot
    kernels more than by the bytes of the weights (experiments/results/bench_decode.md has both)."""
    if requested == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if requested not in DTYPES:
        raise ValueError(f"dtype={requested!r} is not supported; choose one of auto, {', '.join(DTYPES)}")
    return requested


class LLM:
    """Load a model once, then generate for batches of prompts on the continuous-batching engine.

    >>> llm = LLM(model="path/to/hf_dir", dtype="float32")
    >>> outs = llm.generate(["def add(a, b):"], SamplingParams(temperature=0, max_tokens=32))

    Engine options keep vLLM's names: block_size, num_kv_pages (or kv_cache_memory_bytes; neither:
    512 MiB, or $JAXINFER_KV_CACHE_MEMORY_BYTES, `engine.default_kv_cache_memory_bytes`),
    enable_prefix_caching, max_num_seqs, max_num_batched_tokens, kv_cache_dtype ("auto",
    "fp8_e4m3" (alias "fp8"), "fp8_e5m2", "int8", "int4", "nvfp4"), num_scheduler_steps
    (decode steps fused into one device call while only decodes run; vLLM's multi-step),
    enable_lora / max_loras / max_lora_rank / max_cpu_loras (per-request PEFT LoRA adapters,
    `generate(..., lora_request=LoRARequest(...))`; up to max_loras of them in one batch, `jaxinfer.lora`),
    scheduling_policy ("fcfs", or "priority": `generate(..., priority=[...])`, lower values are
    admitted and served first and preempted last),
    preemption_mode ("recompute", or "swap": a preempted request's K/V waits on the host, at
    most swap_space GiB of it; victims beyond that are recomputed), async_scheduling (each step is
    scheduled and dispatched before the previous one is read back, so the host's scheduling and
    bookkeeping overlap the device's work; not with speculative_config or num_scheduler_steps > 1),
    shape_buckets (the sizes an engine call's rows, prefill tokens and page-table width are padded to,
    each a compiled program: "fine", 4 sizes per doubling, at most 25% padding; "pow2", powers of
    two, about half the programs for up to 2x padding; or "slots", pow2 with every decode call at
    max_num_seqs rows, one decode program, as a fixed set of decode slots has.
    `experiments/shape_buckets_cost.py` on the embedded target, 1-16 requests, max_num_seqs 16:
    warm-up 106 s and 34 programs (fine), 57 s and 18 (pow2), 44 s and 14 (slots); warm batches
    0.97x-1.19x the fine grid's time on pow2, and on slots 1.3x-1.9x at 1-7 requests, 0.98x-1.03x at
    9-16; "fine" is the default, for the least padded compute).
    attention_backend: "xla" (plain XLA: `layers.attention`), "pallas" (the Pallas kernels; interpret
    mode on CPU, for correctness), "native" (jaxinfer's CPU kernel for bf16 and float32 decode and
    verification, `cpu_kernels.attention`; everything else on the "xla" path), or "auto":
    "native" for bfloat16 and float32 on CPU where the kernels build, else "xla".
    compilation_cache_dir: keep compiled programs on disk for the next process
    (`jit_cache.enable_compilation_cache`).
    quantization: quantization of the decoder projections at load time: weight-only "int8",
    "int4", "fp8_e4m3", "nvfp4", "mxfp4", "w8a8" (int8 activations too) or "w8a8_fp8" (FP8 activations
    too), with quantization_config
    {"method": "rtn" | "gptq" | "awq", "group_size", "skip", "overrides", ...}
    (`wquant.WeightQuantConfig`); GPTQ and AWQ calibrate on
    quantization_config["calibration"] (token windows [S, T]) or, by default, on windows of the
    standard library's training split encoded by the model's tokenizer.
    weight_layout: how the dense projections are held for compute (`model.runtime_layout`):
    "in_out" ([Din, Dout], the checkpoint layout), "out_in" ([Dout, Din]), "native" (jaxinfer's CPU
    kernels, `cpu_kernels`: bf16 [Dout, Din] with products of up to 64 rows by the AVX512-BF16
    kernel; float32 packed in panels of 32 outputs, `layers.PanelWeight`, every product by the
    float32 kernel), or "auto": on CPU "native" where the kernels are available (built with the
    system's C++ compiler on first use), else "out_in" for bfloat16 (batch-1 decode ~1.2x faster
    than "in_out", 8-16-row steps ~5% slower) and "in_out" for float32; "in_out" off CPU.
    "in_out" on CPU also gives float32 tied embeddings a [D, V] copy as the LM head (`layers.TiedHead`,
    the embedding's bytes once more; greedy decode ~3% faster at 8 rows).
    moe_impl (mixture-of-experts models: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): how the experts run
    (`jaxinfer.moe`): "dense" (every expert on every token), "skip" (only the experts some token
    chose, one `lax.cond` each, on every token), "grouped" (each expert on the tokens that chose
    it, sorted and chunked), or "auto" (on CPU "skip" while the experts average fewer than 16 rows
    of the step, else "grouped"; "dense" off CPU). The outputs are the same.
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                 seed: int = 0, attention_backend: str = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 1024, block_size: int = 16,
                 num_kv_pages: int | None = None, kv_cache_memory_bytes: int | None = None,
                 enable_prefix_caching: bool = True, kv_cache_dtype: str = "auto",
                 speculative_config: dict | None = None, num_scheduler_steps: int = 1,
                 preemption_mode: str = "recompute", swap_space: float = 4.0,
                 compilation_cache_dir: str | None = None, quantization: str | None = None,
                 quantization_config: dict | None = None, weight_layout: str = "auto",
                 enable_lora: bool = False, max_loras: int = 1, max_lora_rank: int = 16,
                 max_cpu_loras: int | None = None, scheduling_policy: str = "fcfs", async_scheduling: bool = False,
                 shape_buckets: str = "fine", moe_impl: str = "auto"):
        if compilation_cache_dir is not None:  # before anything compiles
            enable_compilation_cache(compilation_cache_dir)
        warn_if_near_mapping_limit()  # a sweep of LLMs in one process, before it crashes the compiler
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
        qconfig = dict(quantization_config or {})
        calibration = qconfig.pop("calibration", None)
        quant = WeightQuantConfig.from_args(quantization, qconfig)  # checked before the weights are read
        if weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"weight_layout={weight_layout!r}; choose one of {WEIGHT_LAYOUTS}")
        if moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={moe_impl!r}; choose one of {MOE_IMPLS}")
        self.model_dir = resolve_model(model)
        self.dtype = default_dtype(dtype)
        attention_backend = resolve_backend(attention_backend, self.dtype)
        quantize_now = quant is not None
        if is_orbax_dir(self.model_dir):  # saved by LLM.save, possibly quantized already
            saved = orbax_quantization(self.model_dir)
            if saved is not None and quant is not None:
                raise ValueError(f"{self.model_dir} is already quantized ({saved['quantization']}); "
                                 f"load it without quantization={quantization!r}")
            self.cfg, self.weights = restore_orbax(self.model_dir, self.dtype)
            if saved is not None:
                quant = WeightQuantConfig.from_saved(saved["quantization"])  # the saved codes, as they are
        else:
            pre = hf_quantization(self.model_dir)  # a pre-quantized checkpoint (compressed-tensors, GPTQ, AWQ)
            if pre is not None and quant is not None:
                raise ValueError(f"{self.model_dir} is already quantized ({pre.method}); "
                                 f"load it without quantization={quantization!r}")
            self.cfg, self.weights = load_hf(self.model_dir, self.dtype)
            if pre is not None:
                quant = WeightQuantConfig.of_weights(self.weights, pre.method)
        if moe_impl != "auto":
            if not self.cfg.num_experts:
                raise ValueError(f"moe_impl={moe_impl!r}: {self.model_dir} has no experts (a dense model)")
            self.cfg = dataclasses.replace(self.cfg, moe_impl=moe_impl)
        cfg = self.cfg
        self.max_model_len = cfg.max_position_embeddings if max_model_len is None else max_model_len
        if not (isinstance(self.max_model_len, int) and 1 < self.max_model_len <= cfg.max_position_embeddings):
            raise ValueError(f"max_model_len={max_model_len!r} must be in [2, {cfg.max_position_embeddings}] "
                             "(the model's max_position_embeddings)")
        self.cfg = cfg = cfg.with_context(self.max_model_len)  # longrope: short or long factors, once (vLLM's rule)
        tok_dir = Path(tokenizer) if tokenizer else self.model_dir
        self.tokenizer = Tokenizer.from_dir(tok_dir, cfg.bos_token_id, cfg.eos_token_ids)
        if tokenizer and self.tokenizer is None:
            raise CheckpointError(f"{tok_dir}: no tokenizer.json")
        self.quantization = quant
        if quantize_now:
            self._quantize(quant, calibration)
        self.weights = runtime_layout(self.weights, weight_layout)  # after quantizing, which reads [Din, Dout]
        self.speculative_config = None
        if speculative_config is not None:
            from jaxinfer.spec.config import SpeculativeConfig
            self.speculative_config = SpeculativeConfig.from_dict(speculative_config, cfg)
        self.engine_config = EngineConfig(
            max_model_len=self.max_model_len, block_size=block_size, num_kv_pages=num_kv_pages,
            kv_cache_memory_bytes=kv_cache_memory_bytes, enable_prefix_caching=enable_prefix_caching,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            attention_backend=attention_backend, kv_cache_dtype=kv_cache_dtype,
            speculative_config=self.speculative_config,
            num_scheduler_steps=num_scheduler_steps, preemption_mode=preemption_mode, swap_space=swap_space,
            lora_config=LoRAConfig(max_loras, max_lora_rank, max_cpu_loras) if enable_lora else None,
            scheduling_policy=scheduling_policy, async_scheduling=async_scheduling, shape_buckets=shape_buckets)
        self.engine = LLMEngine(cfg, self.weights, self.tokenizer, self.engine_config,
                                model_id=str(self.model_dir) + (f"@{quant.tag()}" if quant else ""))
        decode_token = self.engine.runner.decode_token
        if self.speculative_config is not None:
            from jaxinfer.spec.loop import SpecDecoder
            self.static = SpecDecoder(self.weights, cfg, self.speculative_config, self.max_model_len,
                                      attention_backend, decode_token)
        else:
            self.static = StaticBatchGenerator(self.weights, cfg, self.max_model_len, attention_backend,
                                               decode_token, self.engine.kv_quant)
        self._rng = random.Random(seed)
        self._counter = 0

    def save(self, path: str | Path, save_format: str = "orbax"):
        """Save the model as loaded (quantized projections included, so GPTQ / AWQ need not run
        again), its tokenizer files beside: `LLM(model=path)` loads it. save_format "orbax": our
        own checkpoint; "hf": a Hugging Face directory in the model's dtype, quantized projections
        in compressed-tensors' format (transformers with compressed-tensors, and vLLM, load it)."""
        path = Path(path)
        if save_format == "orbax":
            save_orbax(path, self.cfg, self.weights,
                       quantization=self.quantization.to_saved() if self.quantization else None)
        elif save_format == "hf":
            export_hf(path, self.cfg, self.weights, dtype=self.dtype)
        else:
            raise ValueError(f"save_format={save_format!r}; choose 'orbax' or 'hf'")
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (self.model_dir / name).is_file():
                shutil.copyfile(self.model_dir / name, path / name)

    def _quantize(self, qc, calibration):
        """Replace self.weights' projections as WeightQuantConfig qc says (calibrating GPTQ / AWQ on the
        given token windows, or on the standard library's training split)."""
        from jaxinfer.corpus import token_windows
        if qc.method != "rtn" and calibration is None:
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer: pass {qc.method} calibration token windows "
                                 "as quantization_config['calibration']")
            calibration = token_windows(self.tokenizer, qc.calibration_samples, qc.calibration_len, "train")
        self.weights = quantize_weights(self.weights, self.cfg, qc, calibration)

    # ------------------------------------------------------------------ API

    def get_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_dir} has no tokenizer.json; pass prompts as token ids")
        return self.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora_request=None, priority: Sequence[int] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt: a string, {"prompt": str}, {"prompt_token_ids": [...]}, or a list.

        Every prompt is validated before any work starts (ValueError names the problem).
        Runs on the continuous-batching engine (every speculative method too; `generate_static`
        runs the jit-compiled static loop).
        lora_request: a `LoRARequest` for every prompt, or one per prompt (None: the base model);
        needs enable_lora=True. priority: one integer per prompt (scheduling_policy="priority")."""
        groups = self._make_requests(prompts, sampling_params, lora_request, priority)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(groups), desc="requests", unit="req")
        try:
            for seqs in groups:
                self.engine.add_sequences(seqs)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            # An error or Ctrl-C mid-call: drop this call's requests (their pages return at once)
            # so that the same LLM serves the next call instead of replaying them.
            for seqs in groups:
                self.engine.abort_request(seqs[0].request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[seqs[0].request_id] for seqs in groups]

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None, lora_request=None) -> list[RequestOutput]:
        """Generate replies to one conversation ([{"role", "content"}, ...]) or a list of them, as
        vLLM's `LLM.chat`: each is rendered by the model's chat template (`jaxinfer.chat`: the text
        transformers' `apply_chat_template` renders), tokenized without added special tokens, and
        generated like `generate` (one SamplingParams, or one per conversation). chat_template:
        Jinja source, or the name of one of the checkpoint's named templates. Every conversation
        is rendered and validated before any work starts."""
        tok = self.get_tokenizer()
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
            conversations = [messages]
        elif isinstance(messages, (list, tuple)) and messages:
            conversations = list(messages)
        else:
            raise ValueError(f"messages={messages!r}: expected a conversation (a list of {{'role', 'content'}} "
                             "dicts) or a non-empty list of conversations")
        prompts = []
        for conversation in conversations:
            text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, tools=tools,
                                           chat_template=chat_template, **(chat_template_kwargs or {}))
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def generate_static(self, prompts, sampling_params=None, batch_size: int | None = None) -> list[RequestOutput]:
        """Static batching baseline: padded batches, one whole on-device generation after another
        (speculative, with any method, when speculative_config is set)."""
        if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer (None: max_num_seqs)")
        groups = self._make_requests(prompts, sampling_params)
        self.static.run([s for seqs in groups for s in seqs], batch_size or self.engine_config.max_num_seqs)
        outs = []
        for seqs in groups:
            out = seqs[0].to_output()
            out.outputs = [s.completion() for s in seqs]
            outs.append(out)
        return outs

    def beam_search(self, prompts, params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search for every prompt (forms as in `generate`): params.beam_width finished beams
        each, best first (`jaxinfer.beam`: transformers' algorithm, one jitted loop per batch of
        max_num_seqs // beam_width prompts). Every prompt is validated before any work starts."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be BeamSearchParams, got {type(params).__name__}")
        if params.beam_width > self.cfg.vocab_size:  # more beams than first tokens to tell them apart
            raise ValueError(f"BeamSearchParams.beam_width={params.beam_width} exceeds the model's "
                             f"vocab_size={self.cfg.vocab_size}")
        ids = [self.engine.inputs.prompt_ids(p)[1] for p in _prompt_list(prompts)]
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} is empty (0 tokens)")
            if len(p) + params.max_tokens > self.max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_tokens={params.max_tokens} it needs "
                                 f"{len(p) + params.max_tokens} > max_model_len={self.max_model_len}")
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda ids: None)
        return run_beam_search(self.weights, self.cfg, ids, params, self.cfg.eos_token_ids,
                               self.engine_config.max_num_seqs, decode, self.engine_config.attention_backend,
                               self.engine.kv_quant)

    def stream(self, prompt, sampling_params: SamplingParams | None = None, lora_request=None) -> Iterator[str]:
        """Yield the text of one request as the engine produces it."""
        (seqs,) = self._make_requests([prompt], [sampling_params or SamplingParams()], lora_request)
        if len(seqs) != 1:
            raise ValueError("stream() takes SamplingParams.n == 1")
        self.engine.add_sequences(seqs)
        rid = seqs[0].request_id
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step(delta=True):
                    if out.request_id == rid:
                        if out.outputs[0].text:
                            yield out.outputs[0].text
                        if out.finished:
                            return
        finally:
            if seqs[0].status is not Status.FINISHED:
                self.engine.abort_request(rid)

    def get_stats(self):
        """Engine statistics (KV usage, prefix cache, preemptions, compilations, speculation)."""
        return self.engine.get_stats()

    def spec_stats(self):
        """Acceptance statistics of the static speculative loop (tau, acceptance rate), or None."""
        return getattr(self.static, "stats", None)

    # ------------------------------------------------------------------ helpers

    def _make_requests(self, prompts, sampling_params, lora_request=None,
                       priority: Sequence[int] | None = None,
                       arrival_time: float | None = None) -> list[list[EngineRequest]]:
        prompts = _prompt_list(prompts)
        n = len(prompts)
        params_list = _per_prompt(SamplingParams() if sampling_params is None else sampling_params, SamplingParams, n,
                                  "SamplingParams", "sampling_params")
        loras = _per_prompt(lora_request, LoRARequest, n, "lora_request entries", "lora_request")
        priorities = _per_prompt(0 if priority is None else priority, int, n, "priority values", "priority")
        now = time.perf_counter() if arrival_time is None else arrival_time
        groups = []
        for p, sp, lr, pr in zip(prompts, params_list, loras, priorities):
            seed = sp.seed if isinstance(sp, SamplingParams) and sp.seed is not None \
                else self._rng.getrandbits(31)
            groups.append(self.engine.make_requests(str(self._counter + len(groups)), p, sp, seed, now, lr, pr))
        self._counter += len(groups)
        return groups


def _prompt_list(prompts) -> list:
    """One prompt (a string or a dict) as a list of one; a non-empty sequence of prompts as a list.
    Each prompt's own form is checked where it is tokenized (`InputProcessor.prompt_ids`)."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not is_list_like(prompts):
        raise ValueError(f"prompts={prompts!r}: expected a prompt (a string, {{'prompt': str}} or "
                         "{'prompt_token_ids': [int, ...]}) or a list of them")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    return prompts


def _per_prompt(value, single: type, n: int, what: str, field: str) -> list:
    """value for each of n prompts: one value (None, or an instance of single) for all, or a
    sequence of n (each None or a single)."""
    if value is None or isinstance(value, single):
        return [value] * n
    if not is_list_like(value):
        raise ValueError(f"{field} must be a {single.__name__} or a list of one per prompt, "
                         f"got {type(value).__name__}")
    values = list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} {what} for {n} prompts")
    for i, v in enumerate(values):
        if not (v is None or isinstance(v, single)) or isinstance(v, bool):
            raise ValueError(f"{field}[{i}] must be a {single.__name__}, got {type(v).__name__}")
    return values


__all__ = ["LLM", "resolve_model", "embedded_models"]
