"""The training corpus of the embedded models: the interpreter's own standard library.

Every machine that runs jaxinfer has it, so the default models can be retrained and
evaluated anywhere without a download.

- `corpus_files()`: the `.py` files of the stdlib in a deterministic (sorted relative path)
  order, without tests (any path component named `test`, `tests`, `idle_test`, `test_*`,
  `*_test`), `site-packages`, and generated data that is not code (the gencodec charmap
  tables in `encodings/`, the `pydoc_data` help-text dump, `_sysconfigdata_*`, the
  `config-*` build directory).
- `split_files()`: a fixed list of whole top-level packages (`HELDOUT_PACKAGES`) is held out;
  it is the evaluation set for perplexity, draft acceptance and quantization quality.
- `train_tokenizer()`: byte-level BPE (HF `tokenizers`) with `<pad>`=0, `<s>`=1, `</s>`=2;
  the post-processor puts `<s>` in front of every encoded text.
- `build_token_streams()`: every document as `<s> ids </s>`, concatenated, cached as .npy.
- `heldout_prompts()`: prompts cut at the start of held-out functions and classes, for the
  speculative-decoding and KV-quantization benchmarks.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
import sysconfig
from pathlib import Path

import numpy as np

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
DEFAULT_VOCAB_SIZE = 4096

# Whole top-level packages never seen in training: ~5% of the corpus tokens, a mix of
# parsing (email, json, tomllib), I/O (wsgiref) and date/time code (zoneinfo).
HELDOUT_PACKAGES = ("email", "json", "tomllib", "wsgiref", "zoneinfo")

_TEST_DIR = re.compile(r"^(tests?|idle_test|test_.*|.*_tests?)$")
_DATA_DIRS = ("pydoc_data", "site-packages", "__pycache__")


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path, root: Path) -> bool:
    parts = rel.parts
    for d in parts[:-1]:
        if _TEST_DIR.match(d) or d in _DATA_DIRS or d.startswith("config-"):
            return True
    name = parts[-1]
    if _TEST_DIR.match(name[:-3]) or name.startswith("_sysconfigdata"):
        return True
    if parts[0] == "encodings":  # gencodec output: 256-entry tables, not code
        with open(root / rel, "rb") as f:
            if b"Python Character Mapping Codec" in f.read(200):
                return True
    return False


def corpus_files(root: Path | None = None) -> list[Path]:
    """Relative paths of the corpus files under root (default: the stdlib), sorted."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {root} is not a directory")
    files = [p.relative_to(root) for p in root.rglob("*.py") if p.is_file()]
    return sorted((f for f in files if not _excluded(f, root)), key=lambda p: p.as_posix())


def package_of(rel: Path) -> str:
    """Top-level package (or module name) of a relative path: email/parser.py -> email."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def split_files(files: list[Path], heldout: tuple[str, ...] = HELDOUT_PACKAGES
                ) -> tuple[list[Path], list[Path]]:
    """(train, heldout): whole packages named in `heldout` go to the held-out split."""
    held = set(heldout)
    train = [f for f in files if package_of(f) not in held]
    test = [f for f in files if package_of(f) in held]
    return train, test


def read_text(path: Path) -> str | None:
    """UTF-8 text of a file, or None if it is not valid UTF-8 (such files are skipped)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def split_texts(split: str, root: Path | None = None, heldout: tuple[str, ...] = HELDOUT_PACKAGES):
    """(relative path, text) of every UTF-8 file of one split ("train" or "heldout"), in corpus order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is not 'train' or 'heldout'")
    root = Path(root) if root is not None else stdlib_root()
    train, test = split_files(corpus_files(root), heldout)
    for f in train if split == "train" else test:
        text = read_text(root / f)
        if text is not None:
            yield f, text


def parsed_files(split: str, root: Path | None = None, heldout: tuple[str, ...] = HELDOUT_PACKAGES):
    """(relative path, text, ast.Module) of every file of one split ("train" or "heldout") that
    is UTF-8 and parses, in corpus order."""
    for f, text in split_texts(split, root, heldout):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        yield f, text, tree


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE `tokenizers.Tokenizer` trained on an iterable of texts.

    GPT-2's pre-tokenizer regex keeps runs of spaces (indentation) together, so the merges
    learn 4-, 8- and 12-space indents as single tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not 512 <= vocab_size <= 65535:
        raise ValueError(f"vocab_size={vocab_size} must be in [512, 65535] (uint16 token streams)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [PAD, BOS, EOS]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> <s> $B",
                                      special_tokens=[("<s>", BOS), ("</s>", EOS)]),
    ])
    return tok


def tokenizer_config_json() -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast (bos added by tokenizer.json)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "pad_token": "<pad>", "add_bos_token": False, "add_eos_token": False,
            "model_max_length": 2048, "clean_up_tokenization_spaces": False}


# ----------------------------------------------------------------------------- token streams

@dataclasses.dataclass(frozen=True)
class CorpusData:
    """Token streams of both splits. train/heldout: uint16 [N] of `<s> doc </s>` runs."""

    tokenizer_path: Path
    train: np.ndarray
    heldout: np.ndarray
    train_files: list[str]
    heldout_files: list[str]
    heldout_doc_starts: np.ndarray  # int64 [num heldout docs], offset of each doc's <s>

    def tokenizer(self):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.tokenizer_path))


def _fingerprint(root: Path, files: list[Path], vocab_size: int) -> str:
    h = hashlib.sha256(f"{root}|{vocab_size}|{HELDOUT_PACKAGES}".encode())
    for f in files:
        h.update(f"{f.as_posix()}:{(root / f).stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _stream(tok, root: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    texts, names = [], []
    for f in files:
        t = read_text(root / f)
        if t is not None:
            texts.append(t)
            names.append(f.as_posix())
    encs = tok.encode_batch(texts, add_special_tokens=False)
    parts, starts, pos = [], [], 0
    for e in encs:
        doc = np.asarray([BOS, *e.ids, EOS], np.uint16)
        parts.append(doc)
        starts.append(pos)
        pos += len(doc)
    return np.concatenate(parts), np.asarray(starts, np.int64), names


def build_corpus(workdir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, root: Path | None = None,
                 heldout: tuple[str, ...] = HELDOUT_PACKAGES, max_files: int | None = None,
                 verbose: bool = True) -> CorpusData:
    """Tokenizer + token streams of the stdlib corpus, cached under workdir/data.

    A rerun with the same files, vocab and split reads the cache (a fingerprint of paths,
    sizes and settings is stored in manifest.json). max_files keeps every n-th file only
    (tests). Returns a CorpusData.
    """
    from tokenizers import Tokenizer

    root = Path(root) if root is not None else stdlib_root()
    files = corpus_files(root)
    if max_files is not None:
        files = files[:: max(1, len(files) // max_files)][:max_files]
    train_files, test_files = split_files(files, heldout)
    if not train_files or not test_files:
        raise ValueError(f"split of {len(files)} files under {root} left train={len(train_files)}, "
                         f"heldout={len(test_files)} files; held-out packages: {heldout}")
    data = Path(workdir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(root, files, vocab_size) + hashlib.sha256(repr(heldout).encode()).hexdigest()[:8]
    manifest_path = data / "manifest.json"
    tok_path = data / "tokenizer.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("fingerprint") == fp:
        m = json.loads(manifest_path.read_text())
        return CorpusData(tok_path, np.load(data / "train.npy"), np.load(data / "heldout.npy"),
                          m["train_files"], m["heldout_files"], np.load(data / "heldout_doc_starts.npy"))

    train_texts = [t for t in (read_text(root / f) for f in train_files) if t is not None]
    tok = train_tokenizer(train_texts, vocab_size)
    tok.save(str(tok_path))
    train, _, train_names = _stream(tok, root, train_files)
    held, held_starts, held_names = _stream(tok, root, test_files)
    np.save(data / "train.npy", train)
    np.save(data / "heldout.npy", held)
    np.save(data / "heldout_doc_starts.npy", held_starts)
    train_bytes = sum(len(t.encode()) for t in train_texts)
    manifest = {
        "fingerprint": fp, "root": str(root), "vocab_size": tok.get_vocab_size(),
        "heldout_packages": list(heldout), "train_files": train_names, "heldout_files": held_names,
        "train_tokens": int(train.size), "heldout_tokens": int(held.size), "train_bytes": train_bytes,
        "bytes_per_token": train_bytes / max(1, train.size),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    if verbose:
        print(f"corpus: {len(train_names)} train files ({train.size:,} tokens, "
              f"{manifest['bytes_per_token']:.2f} bytes/token), {len(held_names)} held-out files "
              f"({held.size:,} tokens, {100 * held.size / (train.size + held.size):.1f}%)")
    return CorpusData(tok_path, train, held, train_names, held_names, held_starts)


# ----------------------------------------------------------------------------- prompts

@dataclasses.dataclass(frozen=True)
class Prompt:
    """A held-out prompt: `text` ends inside the definition `name` of file `source`."""

    source: str  # path relative to the stdlib root, e.g. "json/decoder.py"
    name: str  # qualified name of the function or class
    lineno: int
    text: str


def heldout_prompts(tokenizer, num: int = 64, prompt_tokens: int = 32, context_tokens: int = 0,
                    root: Path | None = None, heldout: tuple[str, ...] = HELDOUT_PACKAGES
                    ) -> list[Prompt]:
    """Prompts cut from held-out code, the shared workload of the later benchmarks.

    Every function and class definition (at any depth) of the held-out files is a
    candidate; `num` of them are taken evenly spaced over the sorted list (deterministic,
    no RNG). A prompt's text is the `context_tokens` tokens of the file before the
    definition (0: none; ~512 emulates a system prompt), followed by the first
    `prompt_tokens` tokens of the definition itself (its signature and the start of its
    body). `tokenizer` is a `jaxinfer.tokenizer.Tokenizer` or a `tokenizers.Tokenizer`.

    The speculative-decoding benchmarks use the defaults (a signature to complete); the
    KV-quantization and prefix-caching benchmarks add context_tokens.
    """
    encode = _encoder(tokenizer)
    decode = tokenizer.decode
    candidates: list[tuple[Path, str, int, str, str]] = []
    for f, text, tree in parsed_files("heldout", root, heldout):
        line_starts = np.cumsum([0] + [len(ln) for ln in text.splitlines(keepends=True)])
        for qual, node in _definitions(tree):
            start = int(line_starts[node.lineno - 1]) + node.col_offset
            candidates.append((f, qual, node.lineno, text[:start], text[start:]))
    if not candidates:
        raise ValueError(f"no definitions found in the held-out packages {heldout}")
    idx = np.linspace(0, len(candidates) - 1, num=min(num, len(candidates))).round().astype(int)
    prompts = []
    for i in idx:
        f, qual, lineno, before, body = candidates[i]
        head = decode(encode(body)[:prompt_tokens])
        ctx = decode(encode(before)[-context_tokens:]) if context_tokens > 0 and before else ""
        prompts.append(Prompt(f.as_posix(), qual, lineno, ctx + head))
    return prompts


def token_windows(tokenizer, num: int, length: int, split: str = "train", seed: int = 0,
                  root: Path | None = None) -> np.ndarray:
    """num windows of `length` tokens, each from a different file of one split ("train" or
    "heldout"), files in a seeded random order and a seeded random start in each: int32
    [num, length]. Calibration data (GPTQ, AWQ) comes from the training split, evaluation windows
    from the held-out one. `tokenizer` as in `heldout_prompts`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is not 'train' or 'heldout'")
    root = Path(root) if root is not None else stdlib_root()
    train, test = split_files(corpus_files(root))
    files = train if split == "train" else test
    encode = _encoder(tokenizer)
    rng = np.random.default_rng(seed)
    out = []
    for idx in rng.permutation(len(files)):
        text = read_text(root / files[idx])
        ids = encode(text) if text else []
        if len(ids) < length:
            continue
        start = int(rng.integers(0, len(ids) - length + 1))
        out.append(ids[start:start + length])
        if len(out) == num:
            break
    if len(out) < num:
        raise ValueError(f"only {len(out)} files of the {split} split hold {length} tokens; ask for fewer or shorter")
    return np.asarray(out, np.int32)


def _encoder(tokenizer):
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return lambda s: tokenizer.encode(s, add_special_tokens=False).ids
    return lambda s: tokenizer.encode(s, add_special_tokens=False)


def _definitions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every def / async def / class, in source order."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qual = f"{prefix}{node.name}"
            yield qual, node
            yield from _definitions(node, qual + ".")
        elif not isinstance(node, (ast.expr, ast.stmt)) or isinstance(node, (ast.If, ast.Try, ast.With)):
            yield from _definitions(node, prefix)
