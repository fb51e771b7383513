"""`jaxinfer` command line: generate (streaming), and the tools added by later modules."""

from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    from jaxinfer import LLM, SamplingParams
    from jaxinfer.jit_cache import enable_compilation_cache

    try:  # None: $JAXINFER_COMPILATION_CACHE or ~/.cache; an unwritable default only costs compile time
        enable_compilation_cache(args.compilation_cache)
    except ValueError:
        if args.compilation_cache is not None:
            raise
    lora = None
    if args.lora_path is not None:  # a PEFT adapter over the model; its rank sizes the slot
        from jaxinfer.lora import LoRARequest, read_adapter_config
        rank = read_adapter_config(args.lora_path).get("r")
        lora = LoRARequest("cli", 1, args.lora_path)
        if args.beam_width is not None:
            raise ValueError("--lora-path runs on the engine; beam search (--beam-width) runs without adapters")
    llm = LLM(model=args.model, dtype=args.dtype, attention_backend=args.attention_backend,
              quantization=args.quantization, enable_lora=lora is not None,
              max_lora_rank=rank if lora is not None and isinstance(rank, int) and rank > 0 else 16)
    if args.beam_width is not None:  # beam search: the best beam, printed once the search is over
        from jaxinfer import BeamSearchParams
        params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens,
                                  temperature=args.temperature, length_penalty=args.length_penalty, seed=args.seed)
        best = llm.beam_search([args.prompt], params)[0].sequences[0]
        sys.stdout.write(args.prompt + llm.get_tokenizer().decode(best.output_token_ids) + "\n")
        return 0
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, seed=args.seed, max_tokens=args.max_tokens,
                            stop=args.stop or None, repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for delta in llm.stream(args.prompt, params, lora_request=lora):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _port(value: str) -> int:
    """argparse type: a TCP port (checked before the model loads)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in [0, 65535]")
    return port


def _serve(args) -> int:
    import json

    from jaxinfer import LLM
    from jaxinfer.jit_cache import enable_compilation_cache
    from jaxinfer.server import serve

    try:
        enable_compilation_cache(args.compilation_cache)
    except ValueError:
        if args.compilation_cache is not None:
            raise
    spec = None
    if args.speculative_config is not None:
        try:
            spec = json.loads(args.speculative_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config {args.speculative_config!r} is not JSON: {e}") from None
    llm = LLM(model=args.model, dtype=args.dtype, attention_backend=args.attention_backend,
              quantization=args.quantization, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
              num_kv_pages=args.num_kv_pages, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
              enable_prefix_caching=not args.no_enable_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
              speculative_config=spec, num_scheduler_steps=args.num_scheduler_steps,
              async_scheduling=args.async_scheduling, shape_buckets=args.shape_buckets)
    serve(llm, args.host, args.port, args.served_model_name)
    return 0


def _quantize(args) -> int:
    from jaxinfer import LLM
    config = {"method": args.method}
    if args.group_size is not None:
        config["group_size"] = args.group_size
    if args.skip:
        config["skip"] = args.skip
    if args.calibration_samples is not None:
        config["calibration_samples"] = args.calibration_samples
    if args.lm_head is not None:
        config["lm_head"] = args.lm_head
    if args.act_order:
        config["act_order"] = True
    if args.routed_experts:
        config["calibrate_all_experts"] = False
    llm = LLM(model=args.model, dtype=args.dtype, quantization=args.quantization, quantization_config=config)
    llm.save(args.out, args.save_format)
    print(f"saved {args.quantization} ({args.method}) {llm.model_dir} to {args.out} ({args.save_format}); "
          f"load it with --model {args.out} or LLM(model={str(args.out)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxinfer", description="JAX/Pallas LLM inference")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a completion of PROMPT")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="HF model directory or embedded model name "
                   "(default: the embedded stdlib-target)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--beam-width", type=int, default=None,
                   help="beam search with this many beams; prints the best beam when done (no streaming)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score = logprob / len ** this")
    g.add_argument("--lora-path", default=None, metavar="DIR", help="a PEFT LoRA adapter directory to generate with")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    g.add_argument("--attention-backend", default="auto", choices=["auto", "xla", "pallas", "native"])
    g.add_argument("--quantization", default=None, metavar="FORMAT",
                   help="quantize the decoder projections at load time, round to nearest: int8, int4, fp8_e4m3, "
                   "nvfp4, mxfp4, w8a8 (int8 activations too) or w8a8_fp8 (FP8 activations too); LLM checks the value")
    g.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="keep compiled programs here for the next run (default: $JAXINFER_COMPILATION_CACHE, "
                   "else ~/.cache/jaxinfer/xla; set the variable to 0 to turn it off)")
    g.set_defaults(func=_generate)
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    s.add_argument("--model", default=None, help="HF model directory or embedded model name")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000, help="TCP port in [0, 65535] (0: any free one)")
    s.add_argument("--served-model-name", default=None, help="the name clients pass as 'model' (default: the "
                   "model directory's name)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    s.add_argument("--attention-backend", default="auto", choices=["auto", "xla", "pallas", "native"])
    s.add_argument("--quantization", default=None, metavar="FORMAT", help="as for generate")
    s.add_argument("--kv-cache-dtype", default="auto")
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--max-num-batched-tokens", type=int, default=1024)
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--num-kv-pages", type=int, default=None)
    s.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    s.add_argument("--no-enable-prefix-caching", action="store_true")
    s.add_argument("--num-scheduler-steps", type=int, default=1)
    s.add_argument("--async-scheduling", action="store_true",
                   help="schedule and dispatch each step before reading back the one before")
    s.add_argument("--shape-buckets", default="fine", choices=["fine", "pow2", "slots"],
                   help="pad each call's rows and tokens to 4 sizes per doubling (fine), to powers of two "
                        "(pow2: about half the compiled programs, more padding), or to powers of two with every "
                        "decode call at --max-num-seqs rows (slots: one decode program)")
    s.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    s.add_argument("--compilation-cache", default=None, metavar="DIR", help="as for generate")
    s.set_defaults(func=_serve)
    q = sub.add_parser("quantize", help="quantize a model's decoder projections (and experts) once (RTN, GPTQ, AWQ) and save it")
    q.add_argument("--model", default=None, help="HF model directory or embedded model name")
    q.add_argument("--quantization", required=True, metavar="FORMAT", help="as for generate")
    q.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq"])
    q.add_argument("--group-size", type=int, default=None)
    q.add_argument("--skip", action="append", help="module kept dense: layers.0, w_down, layers.3.wo (repeatable)")
    q.add_argument("--calibration-samples", type=int, default=None,
                   help="GPTQ / AWQ: token windows from the standard library's training split")
    q.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize input features by decreasing activation energy (static groups)")
    q.add_argument("--lm-head", default=None, metavar="FORMAT", help="quantize the LM head too, to FORMAT (round to nearest)")
    q.add_argument("--routed-experts", action="store_true",
                   help="GPTQ / AWQ of a mixture-of-experts model: each expert calibrates on the tokens routed to "
                        "it (default: on every token)")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    q.add_argument("--out", required=True, help="directory to write (weights, config, tokenizer)")
    q.add_argument("--save-format", default="orbax", choices=["orbax", "hf"],
                   help="orbax: our checkpoint; hf: a Hugging Face directory, the quantized projections in "
                   "compressed-tensors' format (transformers and vLLM load it)")
    q.set_defaults(func=_quantize)
    from jaxinfer.kv.memory import register_cli as register_memory
    register_memory(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # our errors are ValueError subclasses
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
