"""How fast prompt lookup could be on the embedded target: the ceiling its own greedy outputs allow.

Greedy speculative decoding emits exactly plain decoding's tokens, so what prompt lookup accepts
in every round follows from those tokens alone. This decodes bench_spec.py's batch-1 prompts
plainly, then replays the loop's n-gram lookup (`drafters.ngram_lookup`, the same n range) over
each prompt + output, offline: a round with a match verifies k drafts in a (k+1)-token forward
(with --prompt-lookup-scale: the drafts its match length buys) and emits the accepted ones
plus one; a round without runs a one-token step. It times the
target's forward at each width in the same run (`verify_cost.forward_timer`) and prices every
round at that forward alone -- no drafting, sampling, bookkeeping or loop overhead, so the
result bounds what any implementation of prompt lookup reaches on this machine:

    ceiling = (output tokens x one-token forward) / (sum over rounds of the round's forward)

With --branches B > 1 a round instead proposes up to B distinct continuations: those of the
most recent earlier occurrences of the longest matching suffix, each continued as
`drafters.ngram_lookup` continues one. They are verified as one token tree (SpecInfer, Miao et al.
2024; Lookahead decoding's verification branch): the round's forward covers the last token plus
every distinct prefix of the candidates, and accepts the longest candidate that agrees with the
output. It is priced at a plain forward of that width (a tree mask adds no flops), so it asks
whether multi-candidate lookup would pay before anything implements the tree mask.

With --corpus-draft L, a round where prompt lookup finds nothing drafts instead from the training
corpus, as retrieval-based drafting does (REST, He et al. 2024): L tokens chained from the most
frequent next token of the longest context (up to --corpus-ngram tokens) seen in the training
split, tokenized by the target's tokenizer (`corpus_table`). Rounds with a prompt match are the
loop's lookup unchanged. It asks whether a datastore beside the prompt would lift prompt lookup
on the code edits, where the prompt itself offers little; it is not one of the loop's drafters.
Stop 49 (`lookup_ceiling_corpus.md`, scaled lookup k 8): on the code edits 43-45 of ~195 rounds
draft from the corpus and keep 0.47-0.53 tokens each; τ 2.37 -> 2.59 / 2.62 / 2.62 and the
ceiling 1.61x -> 1.66x / 1.59x / 1.44x for 2 / 4 / 8 corpus tokens (continuation: 1.91x -> 1.93x
at most). It is not the route to 2x.

With --oracle it also replays lookup that knows the output (`replay_oracle`): "oracle: length"
drafts the loop's candidate cut to exactly what will be accepted (the bound on any rule for how
long a draft to verify: the scaled widths, adaptive k, confidence cut-offs), "oracle: any match"
the best continuation of any earlier occurrence of any suffix (the bound on any rule for which
match to follow: frequency votes, longer n, token trees with one winner). Stop 51
(`lookup_ceiling_oracle.md`, scaled lookup, code edits, k 8): τ 2.37 / 2.50 / 2.82 and ceiling
2.06x / 2.34x / 2.60x for the loop's rule / oracle length / oracle match (continuation 2.58x /
2.94x / 3.22x). A perfect length rule would gain ~14% and no realizable one gets near it
(replayed that stop, code edits k 8: n up to 6 or 8, 3 drafts per matched token, a
majority vote over all earlier occurrences: τ 2.37-2.43, ceiling within 3% of the loop's).

It also reports where the repeats that prompt lookup finds come from: the share of output tokens
that complete a 4-gram of the prompt (the answer copying its prompt, the regime the code_edit
set is meant to create) and the share that complete a 4-gram found only earlier in the output
(the model repeating itself).

Writes experiments/results/lookup_ceiling.{json,md}.

    python experiments/lookup_ceiling.py [--dtype float32] [--ks 2 4 8 11 15] [--prompts 4]
    python experiments/lookup_ceiling.py --prompt-lookup-min 1 --prompt-lookup-scale 2 --ks 4 8 --out ...scaled
    python experiments/lookup_ceiling.py --prompt-lookup-min 1 --prompt-lookup-scale 2 --ks 8 --branches 1 2 3 --out ...tree
    python experiments/lookup_ceiling.py --prompt-lookup-min 1 --prompt-lookup-scale 2 --ks 8 --corpus-draft 0 2 4 8 \
        --out experiments/results/lookup_ceiling_corpus
    python experiments/lookup_ceiling.py --prompt-lookup-min 1 --prompt-lookup-scale 2 --ks 4 8 --oracle \
        --out experiments/results/lookup_ceiling_oracle
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_spec import code_edit_prompts, continuation_prompts, plain_runner  # noqa: E402
from verify_cost import forward_timer  # noqa: E402

from jaxinfer import generate as gen  # noqa: E402
from jaxinfer.checkpoint import load_hf  # noqa: E402
from jaxinfer.layers import ATTENTION_BACKENDS, resolve_backend
from jaxinfer.llm import resolve_model  # noqa: E402
from jaxinfer.model import runtime_layout  # noqa: E402
from jaxinfer.spec.drafters import draft_widths, lookup_lengths, ngram_lookup  # noqa: E402
from jaxinfer.tokenizer import Tokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def replay(seq: list[int], start: int, k: int, n_max: int, n_min: int, scale: int | None = None) -> list[int]:
    """Rounds of greedy prompt lookup over seq (prompt + greedy output); seq[start] is the first
    output token (from the prefill). Returns each round's verify width: 1 + the drafts proposed
    (k, or with scale the match's `lookup_lengths`), 1 without a match; the tokens a round emits
    are its accepted drafts plus one."""
    hist = jnp.asarray(seq, jnp.int32)[None]
    lengths = None if scale is None else lookup_lengths(k, n_max, scale)
    lookup = jax.jit(lambda pos: ngram_lookup(hist, pos, k, n_max, n_min, lengths)[0])
    p, end, widths = start, len(seq) - 1, []
    while p < end:  # history[p] = x_P: the last emitted token
        draft = np.asarray(lookup(jnp.asarray([p], jnp.int32)))
        if draft[0] < 0:
            widths.append(1)
            p += 1
            continue
        acc = agreed(draft, seq[p + 1:p + 1 + k])
        widths.append(1 + int(np.sum(draft >= 0)))
        p += min(acc + 1, end - p)
    return widths


def agreed(draft, true) -> int:
    """How many leading tokens of draft the output true repeats (the drafts a round accepts)."""
    a = 0
    while a < min(len(draft), len(true)) and draft[a] == true[a]:
        a += 1
    return a


def lookup_candidates(seq: list[int], p: int, k: int, n_max: int, n_min: int, lengths: tuple[int, ...] | None,
                      branches: int) -> list[tuple[int, ...]]:
    """Up to `branches` distinct drafts for the round whose last emitted token is seq[p]: for the
    longest n in n_max..n_min whose suffix occurs earlier, the continuations of its most recent
    occurrences, each as `ngram_lookup` continues its one (periodically past p, lengths[n] long
    with lengths). branches=1 is `ngram_lookup`'s draft."""
    for n in range(n_max, n_min - 1, -1):
        if p - n + 1 < 0:
            continue
        suffix, size, cands = seq[p - n + 1:p + 1], (k if lengths is None else lengths[n]), []
        for start in range(p - n, -1, -1):  # most recent first; ends strictly before p
            if seq[start:start + n] != suffix:
                continue
            after, period = start + n, p - start - n + 1
            cand = tuple(seq[after + i % period] for i in range(size))
            if cand not in cands:
                cands.append(cand)
                if len(cands) == branches:
                    break
        if cands:
            return cands
    return []


def replay_tree(seq: list[int], start: int, k: int, n_max: int, n_min: int, scale: int | None,
                branches: int) -> list[int]:
    """`replay` with up to `branches` candidate drafts per round, verified as one token tree: a
    round's width is 1 + the distinct prefixes of its candidates, and it emits the longest
    candidate prefix the output agrees with, plus one."""
    lengths = None if scale is None else lookup_lengths(k, n_max, scale)
    p, end, widths = start, len(seq) - 1, []
    while p < end:
        cands = lookup_candidates(seq, p, k, n_max, n_min, lengths, branches)
        if not cands:
            widths.append(1)
            p += 1
            continue
        acc = max(agreed(cand, seq[p + 1:p + 1 + k]) for cand in cands)
        widths.append(1 + len({cand[:i] for cand in cands for i in range(1, len(cand) + 1)}))
        p += min(acc + 1, end - p)
    return widths


def corpus_table(tok_dir: Path, n_max: int, bits: int) -> list[dict[int, int]]:
    """Next-token tables of the training split: tables[n] maps a context of n tokens (packed as one
    integer, `bits` a token) to its most frequent next token (ties: the lowest id)."""
    from tokenizers import Tokenizer as HFTokenizer

    from jaxinfer import corpus
    hft = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    texts = [t for _, t in corpus.split_texts("train")]
    stream = np.concatenate([np.asarray(e.ids, np.int64) for e in hft.encode_batch(texts, add_special_tokens=False)])
    tables = [{}]
    for n in range(1, n_max + 1):
        key = np.zeros(stream.size - n, np.int64)
        for t in range(n):
            key = (key << bits) | stream[t:stream.size - n + t]
        pair = (key << bits) | stream[n:]
        uniq, counts = np.unique(pair, return_counts=True)
        ctx, nxt = uniq >> bits, uniq & ((1 << bits) - 1)
        order = np.lexsort((nxt, -counts, ctx))  # by context, then count (high first), then id
        ctx, nxt = ctx[order], nxt[order]
        first = np.ones(ctx.size, bool)
        first[1:] = ctx[1:] != ctx[:-1]
        tables.append(dict(zip(ctx[first].tolist(), nxt[first].tolist())))
    return tables


def corpus_draft(tables: list[dict[int, int]], context: list[int], length: int, bits: int) -> list[int]:
    """Up to `length` tokens chained from the corpus tables (longest known context first); fewer
    where no context of any length is known."""
    ctx, out = list(context), []
    for _ in range(length):
        for n in range(min(len(tables) - 1, len(ctx)), 0, -1):
            key = 0
            for t in ctx[-n:]:
                key = (key << bits) | t
            if key in tables[n]:
                out.append(tables[n][key])
                ctx.append(out[-1])
                break
        else:
            break
    return out


def replay_corpus(seq: list[int], start: int, k: int, n_max: int, n_min: int, scale: int | None,
                  tables: list[dict[int, int]], length: int, bits: int) -> tuple[list[int], int, int]:
    """`replay` with a corpus draft of `length` tokens (`corpus_draft`, verified as wide as the loop's
    draft width that holds it) in rounds without a prompt match. Returns the rounds' widths, the
    corpus rounds and the drafts they got accepted."""
    lengths = None if scale is None else lookup_lengths(k, n_max, scale)
    p, end, widths, rounds, accepted = start, len(seq) - 1, [], 0, 0
    while p < end:
        cands = lookup_candidates(seq, p, k, n_max, n_min, lengths, 1)
        draft = list(cands[0]) if cands else corpus_draft(tables, seq[:p + 1], length, bits)
        if not draft:
            widths.append(1)
            p += 1
            continue
        acc = agreed(draft, seq[p + 1:p + 1 + len(draft)])
        widths.append(1 + (len(draft) if cands else min(w for w in draft_widths(k) if w >= len(draft))))
        rounds, accepted = rounds + (not cands), accepted + (0 if cands else acc)
        p += min(acc + 1, end - p)
    return widths, rounds, accepted


def replay_oracle(seq: list[int], start: int, k: int, n_max: int, n_min: int, any_candidate: bool) -> list[int]:
    """Rounds of prompt lookup that knows the output: each round drafts exactly the tokens it will
    have accepted, verified at the smallest of the loop's draft widths (`draft_widths`) that holds
    them, and a round that would accept nothing runs a one-token step. any_candidate False: the
    loop's candidate (the most recent occurrence of the longest matching suffix, n_max..n_min) cut
    to its accepted prefix -- the bound on any rule for how long a draft to verify; True: the best
    continuation of any earlier occurrence of any suffix of n_max..1 tokens -- the bound on any
    rule for which match to draft from (and how long). Returns each round's verify width."""
    widths_k = draft_widths(k)
    p, end, widths = start, len(seq) - 1, []
    while p < end:
        best = 0
        for n in range(n_max, (0 if any_candidate else n_min - 1), -1):
            cands = lookup_candidates(seq, p, k, n, n, None, p + 1 if any_candidate else 1)
            best = max([best] + [agreed(cand, seq[p + 1:p + 1 + k]) for cand in cands])
            if cands and not any_candidate:
                break
        widths.append(1 + min(w for w in widths_k if w >= best) if best else 1)
        p += min(best + 1, end - p)
    return widths


def repeat_shares(seq: list[int], start: int, n: int = 4) -> tuple[float, float]:
    """(share of output tokens seq[start:] completing an n-gram of the prompt seq[:start], share
    completing an n-gram only earlier in the output): each token counted with its n - 1 predecessors."""
    prompt = {tuple(seq[j:j + n]) for j in range(start - n + 1)}
    seen: set = set()
    copied = repeated = 0
    for i in range(start, len(seq)):
        gram = tuple(seq[i - n + 1:i + 1])
        if gram in prompt:
            copied += 1
        elif gram in seen:
            repeated += 1
        if i - n + 1 >= start:  # n-grams wholly inside the output
            seen.add(gram)
    total = len(seq) - start
    return copied / total, repeated / total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stdlib-target")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 11, 15])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per set (bench_spec's batch-1 default: 4)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--prompt-lookup-scale", type=int, default=None,
                    help="drafts per matched token (NgramDrafter.scale): rounds verify 1 + lookup_lengths[n] wide")
    ap.add_argument("--branches", type=int, nargs="+", default=[1],
                    help="candidate drafts per round, verified as a token tree (1: the loop's prompt lookup)")
    ap.add_argument("--corpus-draft", type=int, nargs="+", default=[],
                    help="drafts a round without a prompt match takes from the training corpus (0: none; needs "
                         "one branch)")
    ap.add_argument("--oracle", action="store_true",
                    help="also replay lookup that knows the output (replay_oracle): its best draft length, and its "
                         "best candidate of any earlier match")
    ap.add_argument("--corpus-ngram", type=int, default=4, help="longest corpus context --corpus-draft matches")
    ap.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_BACKENDS),
                    help="as LLM(attention_backend=...) and bench_spec.py (auto: native on CPU where the kernels build)")
    ap.add_argument("--out", default=str(RESULTS / "lookup_ceiling"))
    args = ap.parse_args(argv)
    backend = resolve_backend(args.attention_backend, args.dtype)

    target_dir = resolve_model(args.model)
    cfg, weights = load_hf(target_dir, args.dtype)
    weights = runtime_layout(weights)
    tok = Tokenizer.from_dir(target_dir, cfg.bos_token_id, cfg.eos_token_ids)
    m = args.max_tokens
    sets = {"continuation": continuation_prompts(tok, args.prompts), "code_edit": code_edit_prompts(tok, args.prompts)}
    longest = max(len(p) for v in sets.values() for p in v)
    s = gen.round_up(longest + m + 1, 64)
    # Each width timed in 5 interleaved rounds, median: a slow moment of the shared machine then
    # moves one sample of every width instead of one width's price. Each program compiles once.
    scale = args.prompt_lookup_scale
    widths = sorted({1} | {1 + w for k in args.ks for w in (draft_widths(k) if scale else (k,))}
                    | {t for k in args.ks for t in range(2, 2 + max(args.branches) * k) if max(args.branches) > 1}
                    | {1 + w for k in args.ks for w in draft_widths(k) if args.corpus_draft or args.oracle})
    tables, bits = [], (cfg.vocab_size - 1).bit_length()
    if args.corpus_draft:
        if (args.corpus_ngram + 1) * bits > 63:  # a context and its next token packed in one int64
            raise SystemExit(f"--corpus-ngram {args.corpus_ngram}: {args.corpus_ngram + 1} tokens of {bits} bits "
                             "do not fit in 63")
        tables = corpus_table(Path(target_dir), args.corpus_ngram, bits)
        print("corpus contexts by length: " + ", ".join(f"{n}: {len(t):,}" for n, t in enumerate(tables) if n),
              flush=True)
    timers = [forward_timer(weights, cfg, 1, t, context=longest + m // 2, backend=backend) for t in widths]
    samples = [[timed() for timed in timers] for _ in range(5)]
    cost = dict(zip(widths, np.median(samples, axis=0).tolist()))
    print("forward ms by width: " + ", ".join(f"T={t}: {v:.3f} ({v / cost[1]:.2f}x)" for t, v in cost.items()),
          flush=True)

    rows, shares, corpus_rows = [], {}, []
    for name, prompts in sets.items():
        seqs = []
        for p in prompts:  # plain greedy decoding, EOS ignored, as bench_spec times it
            run = plain_runner(weights, cfg, gen.bucket(len(p)), s, m, 0.0, backend=backend)
            out = np.asarray(run([p], 0).out_tokens)[0, :m].tolist()
            seqs.append((p + out, len(p)))
        both = np.mean([repeat_shares(seq, start) for seq, start in seqs], axis=0)
        shares[name] = {"copied_from_prompt": float(both[0]), "repeated_output": float(both[1])}
        print(f"{name:12s} output tokens completing a prompt 4-gram {both[0]:.1%}, "
              f"repeating only an earlier output 4-gram {both[1]:.1%}", flush=True)
        n_range = (args.prompt_lookup_max, args.prompt_lookup_min)
        for k in args.ks:
            # the tree replay's single-candidate case is the loop's lookup, round for round
            assert all(replay_tree(seq, start, k, *n_range, scale, 1) == replay(seq, start, k, *n_range, scale)
                       for seq, start in seqs[:1])
            runs = {b: [replay(seq, start, k, *n_range, scale) if b == 1 else replay_tree(seq, start, k, *n_range, scale, b)
                        for seq, start in seqs] for b in args.branches}
            for label, any_candidate in ((("oracle: length", False), ("oracle: any match", True)) if args.oracle else ()):
                runs[label] = [replay_oracle(seq, start, k, *n_range, any_candidate) for seq, start in seqs]
            emitted = sum(len(seq) - 1 - start for seq, start in seqs)
            for b, per_prompt in runs.items():
                widths = [w for prompt_widths in per_prompt for w in prompt_widths]
                matched = sum(w > 1 for w in widths)
                row = {"set": name, "k": k, "branches": b, "rounds": len(widths), "matched_rounds": matched,
                       "tau": emitted / len(widths),
                       "tau_matched": (emitted - (len(widths) - matched)) / max(matched, 1),
                       "mean_width": sum(widths) / len(widths),
                       "ceiling": emitted * cost[1] / sum(cost[w] for w in widths)}
                rows.append(row)
                print(f"{name:12s} k={k:2d} {b if isinstance(b, str) else f'branches {b}'}: rounds {len(widths)} "
                      f"({matched} with a match)  τ {row['tau']:.2f}  (matched rounds {row['tau_matched']:.2f})  "
                      f"mean width {row['mean_width']:.2f}  ceiling {row['ceiling']:.2f}x", flush=True)
            for length in args.corpus_draft:
                runs = [replay_corpus(seq, start, k, *n_range, scale, tables, length, bits) for seq, start in seqs]
                widths = [w for r in runs for w in r[0]]
                emitted = sum(len(seq) - 1 - start for seq, start in seqs)
                corpus_rounds, accepted = sum(r[1] for r in runs), sum(r[2] for r in runs)
                row = {"set": name, "k": k, "corpus_draft": length, "rounds": len(widths), "corpus_rounds": corpus_rounds,
                       "corpus_accepted_per_round": accepted / max(corpus_rounds, 1), "tau": emitted / len(widths),
                       "mean_width": sum(widths) / len(widths),
                       "ceiling": emitted * cost[1] / sum(cost[w] for w in widths)}
                corpus_rows.append(row)
                print(f"{name:12s} k={k:2d} corpus draft {length}: rounds {len(widths)} ({corpus_rounds} from the "
                      f"corpus, {row['corpus_accepted_per_round']:.2f} accepted each)  τ {row['tau']:.2f}  mean width "
                      f"{row['mean_width']:.2f}  ceiling {row['ceiling']:.2f}x", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(model=args.model, dtype=args.dtype, attention_backend=backend, prompts=args.prompts, max_tokens=m,
                ngram=[args.prompt_lookup_min, args.prompt_lookup_max], prompt_lookup_scale=scale, forward_ms={str(t): v for t, v in cost.items()},
                command="python experiments/lookup_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, corpus_rows=corpus_rows,
                                                        repeat_shares=shares), indent=1) + "\n")
    md = [f"# Prompt-lookup ceiling on {args.model} ({args.dtype}, attention {backend}, batch 1, greedy)", "",
          f"`{meta['command']}`: {args.prompts} prompts per set (bench_spec's), {m} tokens each, n = "
          f"{args.prompt_lookup_min}..{args.prompt_lookup_max}"
          + (f", {scale} drafts per matched token (rounds as wide as their drafts)" if scale else "")
          + ". Every round priced at the target's forward "
          "over its width alone (median of 5 interleaved timings: " + ", ".join(f"T={t}: {v:.3f} ms" for t, v in cost.items())
          + "), so the ceiling leaves out all drafting, sampling and loop costs.", "",
          "| set | k | branches | rounds | with a match | τ | τ of matched rounds | mean width | ceiling |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['set']} | {r['k']} | {r['branches']} | {r['rounds']} | {r['matched_rounds']} | {r['tau']:.2f} | "
           f"{r['tau_matched']:.2f} | {r['mean_width']:.2f} | {r['ceiling']:.2f}x |" for r in rows]
    if corpus_rows:
        md += ["", (f"Rounds without a prompt match drafting from the training corpus (--corpus-draft; contexts up "
                    f"to {args.corpus_ngram} tokens; 0: prompt lookup alone):"), "",
               "| set | k | corpus draft | rounds | corpus rounds | accepted per corpus round | τ | mean width | ceiling |",
               "|---|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['set']} | {r['k']} | {r['corpus_draft']} | {r['rounds']} | {r['corpus_rounds']} | "
               f"{r['corpus_accepted_per_round']:.2f} | {r['tau']:.2f} | {r['mean_width']:.2f} | {r['ceiling']:.2f}x |"
               for r in corpus_rows]
    md += ["", ("Where the repeats come from (mean over the set's prompts; a token counts with its three "
                "predecessors):"), "",
           "| set | output tokens completing a prompt 4-gram | completing only an earlier output 4-gram |",
           "|---|---|---|"]
    md += [f"| {name} | {v['copied_from_prompt']:.1%} | {v['repeated_output']:.1%} |" for name, v in shares.items()]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
