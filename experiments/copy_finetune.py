"""The embedded target's fourth training stage, `copy`: continue the third stage's export on text
that repeats itself, so that the model copies in context (as larger models do) and prompt lookup
has something to find on the code-editing prompts of `bench_spec.py`.

Each batch of 8 x 512 tokens mixes
- 2 rows of edit documents from the TRAINING split: a function, two blank lines, then the same
  function under its `_v2` name (the held-out functions `bench_spec.py` prompts with are never
  seen),
- 2 rows of repeat documents (`repeat_document`): a random span of training text, three newlines,
  the same span again, never the same twice, so they teach copying rather than the functions,
- 4 rows of plain training windows, so that the model stays a language model of the corpus.
The separator and first 8 tokens of each repeated span, and the renamed header line of each edit
document, carry no loss (`--mask-copy-start 8`): the bench_spec prompt gives that header, so the
model is taught to go on with a copy it has been started on, not to begin one unprompted. The
result is exported in bf16, like the other stages.

The shipped stdlib-target (stop 55) is three such runs from the export of stage `target`
(`train_default_models.py --model target`; it is also the stdlib-target of commit f8dc549). The
first adds random-token repeats, each document drawn from its own 8..512-token alphabet so that
tokens recur within a span as they do in code; the target had no induction mechanism before it.
The next two shift the rows toward repeated text (2 edit / 3 repeat / 1 random / 2 plain), each
from the one before (985-1,009 s each on 2 cores):

    python experiments/copy_finetune.py --model STAGE3_DIR --random-repeat-fraction 0.25 \
        --random-alphabet 8 512 --out-model runs/copy-f --out experiments/results/copy_finetune_random_alphabet
    python experiments/copy_finetune.py --model runs/copy-f --random-repeat-fraction 0.125 \
        --repeat-fraction 0.375 --random-alphabet 8 512 --seed 1 --out-model runs/copy-g \
        --out experiments/results/copy_finetune_copy_g
    python experiments/copy_finetune.py --model runs/copy-g --random-repeat-fraction 0.125 \
        --repeat-fraction 0.375 --random-alphabet 8 512 --seed 2 \
        --out-model jaxinfer/assets/models/stdlib-target --out experiments/results/copy_finetune_copy_h
    python experiments/copy_probe.py --models ... stdlib-target
    python experiments/lookup_ceiling.py --model stdlib-target --prompt-lookup-min 1 --prompt-lookup-scale 2 \
        --ks 8 --prompts 8 --out experiments/results/lookup_ceiling_copy_h_8prompts

Each prints the held-out cross-entropy before and after (plain windows; edit documents built from
held-out functions; the copies of held-out text repeated, past their first 8 tokens), and
`unprompted_copies`: greedy continuations of 32 held-out prompts that write a `_v2` name.

| run | plain | edit | repeat copies | unprompted `_v2` |
|---|---|---|---|---|
| stage 3 (start) | 3.182 | 2.980 | 2.887 | 0 of 32 |
| copy-f | 3.146 | 2.414 | 1.649 | 0 |
| copy-g | 3.173 | 2.227 | 1.083 | 0 |
| copy-h (shipped) | 3.172 | 2.119 | 0.731 | 0 |

`copy_probe.py` (teacher-forced top-1 past the first 8 copied tokens; random tokens / held-out text /
held-out function bodies after the renamed header): stage 3 0.3% / 48.8% / 47.6%, copy-f 96.1% /
68.4% / 70.5%, copy-g 98.8% / 79.1% / 81.3%, copy-h 99.5% / 85.7% / 86.9%. Scaled lookup's
replayed τ on bench_spec's code-edit prompts at k 8 (`lookup_ceiling_copy_{f,g,h}_{4,8}prompts.md`):
2.85 / 3.69, 2.97 / 4.08, 3.39 / 4.32 on 4 / 8 prompts; 64.9% of copy-h's greedy output on the 8
completes a 4-gram of the prompt (stage 3: 3.6%). bench_spec's n-gram methods at k 4 / 8 after
each run (`bench_spec_b1_greedy_s54_copy_f.md`, `bench_spec_b1_greedy_s55_copy_{g,h}.md`), best
on code edits / continuation: copy-f 1.99x / 1.75x, copy-g 1.92x / 2.47x, copy-h 2.25x / 2.09x
(scaled lookup, k 8, τ 3.54 on code edits). The cost: held-out plain CE 3.172 against
3.116 for stop 53's stage below, which copies far less.

Stop 53's stage, shipped until stop 55 (`copy_finetune_masked.json`, 1064 s, runs/copy-d): one run
of the defaults from stage 3 (2 edit / 2 repeat / 4 plain rows):

    python experiments/copy_finetune.py --model STAGE3_DIR --out-model runs/copy-d \
        --out experiments/results/copy_finetune_masked

held-out CE plain 3.182 -> 3.116, edit documents 2.980 -> 2.543, 0 of 32 unprompted `_v2`; it has
no induction mechanism (random copies 0.9%, text 59.5%, bodies 62.4%). Scaled lookup's replayed τ at
k 8 (`lookup_ceiling_copy_target_masked_{4,8}prompts.md`): 2.42 on the default 4 (stage 3: 2.37),
2.67 on 8 (stage 3: 2.52); 19.3% / 13.7% of the greedy output there completes a 4-gram of the
prompt (stage 3: 5.1% / 3.6%); bench_spec's code edits 1.71x.

Recipes not shipped:
- stop 52's, the same without masks (`--mask-copy-start 0`, `copy_finetune_repeat.json`, runs/copy-a;
  shipped for an hour in stop 53): held-out CE 3.119 / 2.439, code-edit τ 3.08 on the default 4
  prompts and 2.65 on 8, 31.4% / 24.7% copied; but it had learned the edit documents' template:
  5 of 32 greedy held-out continuations wrote a `<name>_v2` function nobody asked for. Its gain
  on the 4 prompts (which end in such a header) was largely that template.
- stop 36, 600 steps at lr 1e-3 with 6 of 8 rows edits and no repeat rows (`--edit-fraction 0.75
  --repeat-fraction 0 --lr 1e-3 --steps 600`, `copy_finetune.json`): held-out CE plain 3.182 ->
  3.259, edits 2.980 -> 2.081; 57.8% of the code-edit output from a prompt 4-gram, but its copies
  drift within a line or two: τ at k 8 2.21 -> 2.54 (`lookup_ceiling_copy_target.md`), n-gram
  1.56x-1.73x (`bench_spec_copy_target.md`). Another 600 steps from it at lr 5e-4
  (`*_copy_target_1200.*`): τ 2.91, 1.70x, held-out CE 3.395 / 2.273 (memorizing the training
  edits). 240 steps at lr 3e-4 with half the rows edits: 6.4% copied, τ 2.50.
- stop 52, 300 more steps of the unmasked mix from runs/copy-a (`--seed 1`): held-out CE 3.147 /
  2.271, τ 2.67 at k 8, 1.84x vs 1.72x for stage 3 in the same minutes.
- stop 54, a quarter of the rows random-token repeats (`--random-repeat-fraction 0.25`, 2 edit / 2
  repeat / 2 random / 2 plain rows, `copy_finetune_random_repeat.json`, runs/copy-e): the target
  had no induction mechanism (`copy_probe.py`: 64 repeated random tokens copied at 0.9% top-1);
  this learns one (98.5%), but copies of held-out text rise only from 60% to 68% top-1. Held-out
  CE 3.142 / 2.425 (repeat copies 2.887 -> 1.623), 0 of 32 unprompted `_v2`; replayed code-edit τ
  2.79 / 2.63 on 4 / 8 prompts (`lookup_ceiling_copy_e_*`), and its greedy continuations loop more
  (80% of their tokens repeat an earlier output 4-gram, against 71%).
- stop 54, the same with each random document drawn from its own alphabet of 8-512 tokens
  (`--random-alphabet 8 512`, `copy_finetune_random_alphabet.json`, runs/copy-f), so that tokens
  recur within a span as they do in code: random copies 96.1%, text 68.4%, bodies 70.5%; held-out
  CE 3.146 / 2.414 / 1.649, 0 of 32 `_v2`; replayed code-edit τ 2.85 / 3.69 on 4 / 8 prompts, and
  bench_spec's code edits 1.99x (k 8, τ 2.95) but continuation 1.75x at best (n-gram; scaled
  lookup's τ 2.26 at k 8: it loops less, 42% of its continuation output repeating itself against
  71%; `bench_spec_b1_greedy_s54_copy_f.md`). Held-out NLL 3.0891, top-1 42.8%
  (`default_models_copy_f.md`; the shipped target 3.0834, 42.3%).
  Not shipped in stop 54 (it traded the met continuation 2.65x for a code-edit figure still short
  of 2x); in stop 55 it became the first of the shipped target's three runs (above).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinfer import LLM, SamplingParams, corpus, train
from jaxinfer.checkpoint import export_hf, load_hf
from jaxinfer.llm import resolve_model
from jaxinfer.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"


def edit_documents(tok: Tokenizer, split: str, min_tokens: int = 40, max_tokens: int = 240,
                   mask_header: bool = False) -> list[tuple[list[int], list[int]]]:
    """Every top-level function of the split's files with min..max tokens, as the tokens of
    `src + "\\n\\n\\n" + src renamed to <name>_v2` (bench_spec's code-edit prompt plus its answer)
    and their loss weights: with mask_header, 0 on the renamed header line, which the prompt gives
    (so the model learns to copy a function whose new header it was shown, not to write `_v2`
    functions unprompted); 1 elsewhere."""
    docs = []
    for _, text, tree in corpus.parsed_files(split):
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                src = ast.get_source_segment(text, node)
                if not src or not min_tokens <= len(tok.encode(src, add_special_tokens=False)) <= max_tokens:
                    continue
                renamed = src.replace(f"def {node.name}(", f"def {node.name}_v2(", 1)
                ids = tok.encode(f"{src}\n\n\n{renamed}")
                weights = [1] * len(ids)
                if mask_header:  # tokens can merge across the boundaries: mask from the last shared one
                    a = len(os.path.commonprefix([ids, tok.encode(f"{src}\n\n\n")])) - 1
                    b = len(os.path.commonprefix([ids, tok.encode(f"{src}\n\n\n{renamed.split(chr(10), 1)[0]}")]))
                    weights[a:b] = [0] * (b - a)
                docs.append((ids, weights))
    return docs


def pack(draw, rng, num: int, length: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """num windows of `length` tokens, each documents draw(rng) -> (tokens, loss weights) joined by
    EOS (weight 1) -> (tokens [num, length] int32, weights [num, length] float32)."""
    out, w = np.zeros((num, length), np.int32), np.ones((num, length), np.float32)
    for i in range(num):
        row: list[int] = []
        wrow: list[int] = []
        while len(row) < length:
            ids, weights = draw(rng)
            row += ids + [eos]
            wrow += weights + [1]
        out[i], w[i] = row[:length], wrow[:length]
    return out, w


def pick(docs: list[tuple[list[int], list[int]]]):
    """A `pack` draw: one of docs at random."""
    return lambda rng: docs[int(rng.integers(len(docs)))]


def repeated(piece: list[int], sep: list[int], masked: int, first_weight: int) -> tuple[list[int], list[int]]:
    """piece + sep + piece and its loss weights: first_weight on the first piece, 1 on the copy
    except, with masked > 0, the separator and the copy's first `masked` tokens (0)."""
    n = len(piece)
    weights = [first_weight] * n + [1] * (n + len(sep))
    if masked:
        weights[n:n + len(sep) + min(masked, n)] = [0] * (len(sep) + min(masked, n))
    return piece + sep + piece, weights


def repeat_document(windows: np.ndarray, sep: list[int], span: tuple[int, int] = (48, 224), masked: int = 0,
                    copy_only: bool = False):
    """A `pack` draw: a random span of a training window, sep, then the same span again (the answer
    is the prompt, token for token). Unlike the edit documents these are never the same twice, so
    they teach copying, not the training functions. With masked > 0 the separator and the first
    `masked` tokens of the copy carry no loss: the model learns to go on with a copy it has begun,
    not to start repeating text unprompted. copy_only: no loss on the first span either (to score
    how well a model copies)."""
    def draw(rng) -> tuple[list[int], list[int]]:
        w = windows[int(rng.integers(len(windows)))]
        n = int(rng.integers(span[0], span[1] + 1))
        a = int(rng.integers(0, len(w) - n + 1))
        return repeated(w[a:a + n].tolist(), sep, masked, first_weight=0 if copy_only else 1)
    return draw


def random_repeat_document(vocab: tuple[int, int], sep: list[int], span: tuple[int, int] = (16, 96),
                           masked: int = 0, alphabet: tuple[int, int] | None = None):
    """A `pack` draw like `repeat_document`, but the span is uniform random tokens from
    [vocab[0], vocab[1]): nothing but the earlier occurrence predicts its copy, so all of the
    copy's loss is the induction signal (look up the previous occurrence of the current token and
    predict what followed it), which natural-text spans dilute with what the model can guess
    without copying. With `alphabet` (lo, hi) each document draws from its own random subset of
    lo..hi tokens (log-uniform size), so tokens recur within the span, as `(`, `.` and `self` do
    in code, and only the longer context before a token says which occurrence the copy is at."""
    def draw(rng) -> tuple[list[int], list[int]]:
        n = int(rng.integers(span[0], span[1] + 1))
        if alphabet is None:
            piece = rng.integers(vocab[0], vocab[1], size=n)
        else:
            size = int(np.exp(rng.uniform(np.log(alphabet[0]), np.log(alphabet[1]))))
            piece = rng.choice(np.arange(vocab[0], vocab[1]), size=size, replace=False)[rng.integers(0, size, n)]
        # the random span itself cannot be learned: no loss on it
        return repeated(piece.tolist(), sep, masked, first_weight=0)
    return draw


def unprompted_copies(model: str | Path, num: int = 32, max_tokens: int = 256) -> dict:
    """What the stage teaches that nobody asked for: greedy continuations (max_tokens) of `num`
    held-out continuation prompts (`corpus.heldout_prompts`, 32 tokens each; none asks for a copy),
    counting those that write a `_v2` name (the edit documents' template) and the new top-level
    functions written."""
    llm = LLM(model=str(model))
    prompts = [p.text for p in corpus.heldout_prompts(llm.tokenizer, num=num, prompt_tokens=32)]
    texts = [o.outputs[0].text for o in llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))]
    return {"prompts": len(texts), "write_v2": sum("_v2" in t for t in texts),
            "new_defs": sum(t.count("\ndef ") for t in texts)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="the weights to start from (a name or a directory): the export of stage `target`")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--edit-fraction", type=float, default=0.25, help="rows of each batch that are edit documents")
    ap.add_argument("--repeat-fraction", type=float, default=0.25,
                    help="rows of each batch that are repeat documents (`repeat_document`)")
    ap.add_argument("--random-repeat-fraction", type=float, default=0.0,
                    help="rows of each batch that are repeats of random tokens (`random_repeat_document`)")
    ap.add_argument("--random-alphabet", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                    help="random repeats draw each document's tokens from its own LO..HI of the vocabulary")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--mask-copy-start", type=int, default=8, metavar="N",
                    help="no loss on what starts a copy: the edit documents' renamed header line, and the "
                         "separator plus the first N tokens of each repeated span (0: loss on every token)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-model", default="runs/copy-target")
    ap.add_argument("--out", default=str(RESULTS / "copy_finetune_masked"))
    args = ap.parse_args(argv)

    src_dir = resolve_model(args.model)
    cfg, params = load_hf(src_dir, "float32")
    tok = Tokenizer.from_dir(src_dir, cfg.bos_token_id, cfg.eos_token_ids)
    eos = cfg.eos_token_ids[0]
    rng = np.random.default_rng(args.seed)
    docs = edit_documents(tok, "train", mask_header=args.mask_copy_start > 0)
    n_edit = max(1, round(args.batch * args.edit_fraction))
    n_rep = round(args.batch * args.repeat_fraction)
    n_rand = round(args.batch * args.random_repeat_fraction)
    n_plain = args.batch - n_edit - n_rep - n_rand
    if n_plain < 0:
        raise SystemExit(f"--edit-fraction {args.edit_fraction}, --repeat-fraction {args.repeat_fraction} and "
                         f"--random-repeat-fraction {args.random_repeat_fraction} give {n_edit} + {n_rep} + "
                         f"{n_rand} rows, more than --batch {args.batch}")
    need = args.steps * n_plain + (400 if n_rep else 0)
    plain = np.concatenate([corpus.token_windows(tok, 400, args.seq_len + 1, "train", seed=args.seed + 1 + i)
                            for i in range(-(-need // 400))])  # one window per file and seed
    # repeat documents cut from the last 400 windows, which the plain rows do not use
    sep = tok.encode("\n\n\n", add_special_tokens=False)
    repeat = repeat_document(plain[-400:], sep, masked=args.mask_copy_start)
    random_repeat = random_repeat_document((max(cfg.eos_token_ids) + 1, cfg.vocab_size), sep,
                                           masked=args.mask_copy_start, alphabet=args.random_alphabet)
    held_plain = corpus.token_windows(tok, 16, args.seq_len + 1, "heldout", seed=7)
    held_edit = pack(pick(edit_documents(tok, "heldout")), np.random.default_rng(7), 16, args.seq_len + 1, eos)[0]
    held_repeat = pack(repeat_document(held_plain, sep, masked=8, copy_only=True), np.random.default_rng(7), 16,
                       args.seq_len + 1, eos)
    print(f"{len(docs)} edit documents from the training split; {args.steps} steps of {args.batch} x "
          f"{args.seq_len} tokens ({n_edit} edit rows, {n_rep} repeat rows, {n_rand} random repeat rows each), "
          f"lr {args.lr}", flush=True)

    loss_fn = train.lm_loss_fn(cfg)
    tc = train.TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                           warmup_steps=min(20, args.steps // 10), min_lr_ratio=0.1, weight_decay=0.0)
    opt = train.make_optimizer(tc)
    step_fn, eval_fn = train.make_train_step(loss_fn, opt), train.make_eval_step(loss_fn)

    def heldout(p):
        """Held-out CE: plain windows, edit documents, and the copies of repeat documents (past
        their first 8 tokens) cut from the plain windows."""
        ce = {name: float(np.mean([float(eval_fn(p, jnp.asarray(b[None]))["ce"]) for b in batch]))
              for name, batch in (("plain", held_plain), ("edit", held_edit))}
        ce["repeat"] = float(np.mean([float(eval_fn(p, (jnp.asarray(t[None]), jnp.asarray(w[None])))["ce"])
                                      for t, w in zip(*held_repeat)]))
        return ce

    before = heldout(params)
    print(f"held-out CE before: plain {before['plain']:.3f}, edit documents {before['edit']:.3f}, "
          f"repeat copies {before['repeat']:.3f}", flush=True)
    state = train.init_state(params, opt)
    t0 = time.perf_counter()
    for s in range(args.steps):
        edit_rows, edit_w = pack(pick(docs), rng, n_edit, args.seq_len + 1, eos)
        rows = plain[s * n_plain:(s + 1) * n_plain]
        rep_rows, rep_w = pack(repeat, rng, n_rep, args.seq_len + 1, eos)
        rand_rows, rand_w = pack(random_repeat, rng, n_rand, args.seq_len + 1, eos)
        batch = (np.concatenate([edit_rows, rep_rows, rand_rows, rows]),
                 np.concatenate([edit_w, rep_w, rand_w, np.ones(rows.shape)]))
        state, m = step_fn(state, jax.tree_util.tree_map(jnp.asarray, batch))
        if (s + 1) % 20 == 0:
            print(f"step {s + 1}: loss {float(m['loss']):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    after = heldout(state.params)
    print(f"held-out CE after: plain {after['plain']:.3f}, edit documents {after['edit']:.3f}, "
          f"repeat copies {after['repeat']:.3f}", flush=True)
    out_model = Path(args.out_model)
    export_hf(out_model, cfg, state.params, dtype="bfloat16", tokenizer_json=src_dir / "tokenizer.json",
              generation_config=json.loads((src_dir / "generation_config.json").read_text()))
    (out_model / "tokenizer_config.json").write_text((src_dir / "tokenizer_config.json").read_text())
    seconds = time.perf_counter() - t0
    unprompted = {"before": unprompted_copies(src_dir), "after": unprompted_copies(out_model)}
    print(f"unprompted: {unprompted}", flush=True)
    result = {"args": vars(args), "edit_documents": len(docs), "seconds": seconds,
              "heldout_ce_before": before, "heldout_ce_after": after, "unprompted_copies": unprompted,
              "jax": jax.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_model} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
