"""Persistent compilation cache: compiled XLA programs outlive the process.

A jaxinfer process compiles a prefill and a decode program per shape bucket (the
engine tens of them for a mixed workload: ~70 s on 2 CPU cores), and every run of an
experiment script or ablation sweep compiles them again. With the cache on, JAX writes
each compiled program to a directory and the next process loads it instead of
compiling. Entries are keyed by the program, the compile options, the jax/jaxlib
versions and the device, so an entry from another version or machine is never used.

    from jaxinfer import enable_compilation_cache
    enable_compilation_cache()                     # $JAXINFER_COMPILATION_CACHE or ~/.cache/jaxinfer/xla
    enable_compilation_cache("/scratch/xla-cache")

`jaxinfer generate` turns it on by default; `LLM(compilation_cache_dir=...)` does for
scripts. The cache is process-wide (JAX keeps one): the first directory set wins until
`disable_compilation_cache()`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as cc

ENV_VAR = "JAXINFER_COMPILATION_CACHE"  # a directory; "" or "0" turns the default off
MIN_COMPILE_SECONDS = 0.1  # programs that compile faster are not worth a disk entry


def default_dir() -> Path | None:
    """$JAXINFER_COMPILATION_CACHE if set ("" or "0": None), else $XDG_CACHE_HOME/jaxinfer/xla."""
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return None if env.strip() in ("", "0") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "jaxinfer" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Cache compiled programs in `path` (default: `default_dir()`); returns the directory in
    use, or None when turned off by the environment. Raises ValueError if the directory
    cannot be created or written."""
    d = Path(path).expanduser() if path is not None else default_dir()
    if d is None:
        return None
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".jaxinfer-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"compilation_cache_dir={str(d)!r} is not a writable directory ({e.strerror})") from None
    current = jax.config.jax_compilation_cache_dir
    if current and Path(current) != d:  # JAX keeps one cache per process: the first one set stays
        warnings.warn(f"compilation cache already at {current!r}; {str(d)!r} is not used "
                      "(disable_compilation_cache() first to move it)", stacklevel=2)
        return Path(current)
    if current is None:
        jax.config.update("jax_compilation_cache_dir", str(d))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        cc.reset_cache()  # JAX decides once whether the cache is used: at the first compile
    return d


def disable_compilation_cache():
    """Stop reading and writing the persistent cache in this process."""
    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()


# ----------------------------------------------------------------------------- memory mappings

MAPPING_WARN_FRACTION = 0.6


def memory_mappings() -> tuple[int, int] | None:
    """(memory mappings this process holds, the kernel's per-process limit vm.max_map_count), or
    None where /proc does not tell (not Linux).

    Every compiled XLA:CPU program keeps a few mappings per fused kernel (its code, constants and
    data are mapped separately) for as long as jax's caches hold it: about 250 for a decode
    program of the embedded target. A process that compiles past the limit (65,530 by default,
    i.e. a few hundred programs) dies with a segmentation fault inside the compiler."""
    try:
        with open("/proc/self/maps", "rb") as f:
            held = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    return held, limit


def warn_if_near_mapping_limit(fraction: float = MAPPING_WARN_FRACTION) -> bool:
    """Warn (and return True) when this process holds more than `fraction` of its memory-mapping
    limit, naming the way out; an ablation sweep that builds LLM after LLM in one process is the
    usual way to get there."""
    m = memory_mappings()
    if m is None or m[0] <= fraction * m[1]:
        return False
    warnings.warn(f"this process holds {m[0]:,} of its {m[1]:,} memory mappings (vm.max_map_count); each "
                  "compiled XLA:CPU program holds some until jax's caches let it go, and compiling past the "
                  "limit crashes the process: call jax.clear_caches() between the configurations of a sweep "
                  "(or raise vm.max_map_count)", ResourceWarning, stacklevel=3)
    return True
