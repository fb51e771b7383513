"""LoRA adapters served per request, several in one batch (vLLM's `enable_lora` / `LoRARequest`).

Legend: B rows, T tokens, S adapter slots on device (max_loras), R max_lora_rank, M the
sub-modules of a fused projection (q/k/v: 3, gate/up: 2, o and down: 1).

A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) gives, per layer and
target module, A [r, Din] and B [Dout, r]; the module's output gains (x A^T) B^T * scale, with
scale = lora_alpha / r (lora_alpha / sqrt(r) under use_rslora). The engine keeps S adapters on
device; a fused projection's are held as

    a [Din, M*S*R]        sub-module m, slot s: columns (m*S + s)*R .. +r hold A^T (zero-padded to R)
    b_m [S*R, Dout_m]     per sub-module: rows s*R .. +r hold B^T * scale

so a step computes y = x W + concat_m(((x a)[m-th S*R columns] * mask) b_m), where mask [B, S*R]
keeps each row's own slot's columns (none for a row without an adapter). Every loaded adapter is
computed for every row and masked -- S*R extra matmul columns per sub-module instead of a gather of
per-row matrices -- so the step's shapes never depend on which adapters a batch mixes; a call in
which no row has an adapter runs the base model's program. The scheduler admits a request only
while the running requests need at most S distinct adapters; `LoRAManager.activate` puts a
step's adapters into slots, evicting ones no row of the step uses. Prefix-cache keys carry the
adapter id: K/V computed under one adapter never serves another.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.config import ModelConfig
from jaxinfer.sampling import is_int

# LayerWeights field -> the PEFT module names it fuses, in its column order
FIELDS = {"wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",), "w_gate_up": ("gate_proj", "up_proj"),
          "w_down": ("down_proj",)}
# PEFT module -> (its field, the field's sub-modules it covers). The other layouts' names: a fused
# module (Phi-3's qkv_proj / gate_up_proj, GPT-NeoX's query_key_value) covers its whole field, its A
# shared by the field's sub-modules and its B's rows split among them (exact: each sub-module's delta
# is x A^T B_m^T); an ungated MLP's up (StarCoder2's c_fc, GPT-NeoX's dense_h_to_4h, Phi-2's fc1) is
# its field's one sub-module. `model_modules` says which names a model has.
MODULE_FIELD = {m: (f, (i,)) for f, mods in FIELDS.items() for i, m in enumerate(mods)} | {
    "qkv_proj": ("wqkv", (0, 1, 2)), "query_key_value": ("wqkv", (0, 1, 2)), "gate_up_proj": ("w_gate_up", (0, 1)),
    "dense": ("wo", (0,)),
    "c_fc": ("w_gate_up", (0,)), "dense_h_to_4h": ("w_gate_up", (0,)), "fc1": ("w_gate_up", (0,)),
    "c_proj": ("w_down", (0,)), "dense_4h_to_h": ("w_down", (0,)), "fc2": ("w_down", (0,))}
_KEY = re.compile(r"^base_model\.model\.(?:model|gpt_neox)\.layers\.(\d+)\.(?:self_attn|attention|mlp)\.(\w+)"
                  r"\.lora_([AB])\.weight$")


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """A request's adapter (vLLM's names): lora_int_id >= 1 identifies it (prefix caching, device
    slots); lora_path is a PEFT adapter directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name={self.lora_name!r} must be a non-empty string")
        if not is_int(self.lora_int_id) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id={self.lora_int_id!r} must be an integer >= 1")
        object.__setattr__(self, "lora_path", str(self.lora_path))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Engine-wide limits (vLLM's engine arguments): adapters on device at once, their largest
    rank, and adapters kept loaded on the host."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras

    def __post_init__(self):
        for name in ("max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.max_cpu_loras is not None and (not isinstance(self.max_cpu_loras, int)
                                               or self.max_cpu_loras < self.max_loras):
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras!r} must be an integer >= max_loras={self.max_loras}")


def layer_fields(cfg: ModelConfig, i: int) -> tuple[str, ...]:
    """The fields of layer i that adapters may touch: all four, but only the attention projections of
    a mixture-of-experts layer (its experts are not Linear modules an adapter targets here)."""
    return ("wqkv", "wo") if cfg.is_moe_layer(i) else tuple(FIELDS)


def field_dims(cfg: ModelConfig, field: str) -> tuple[int, list[int]]:
    """(Din, the output width of each sub-module) of a fused projection."""
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return {"wqkv": (d, [n * h, k * h, k * h]), "wo": (n * h, [d]), "w_gate_up": (d, [f, f] if cfg.gated_mlp else [f]),
            "w_down": (f, [d])}[field]


def model_modules(cfg: ModelConfig) -> list[str]:
    """The PEFT module names an adapter of this model may target (the checkpoint's Linear modules)."""
    from jaxinfer.checkpoint import linear_modules  # checkpoint -> model -> layers imports this module
    return linear_modules(cfg)


@dataclasses.dataclass
class HostAdapter:
    """One adapter in the layout of a single slot: per layer, field -> (a [Din, M*R] (sub-module m
    in columns m*R ..), (b_m [R, Dout_m] for each m)) float32 (None: the adapter does not touch
    the field)."""

    request: LoRARequest
    layers: list[dict[str, tuple[np.ndarray, np.ndarray] | None]]


def read_adapter_config(path: str | Path, where: str | None = None) -> dict:
    """A PEFT adapter directory's adapter_config.json (ValueError naming the problem)."""
    where = where or str(path)
    conf_file = Path(path) / "adapter_config.json"
    if not conf_file.is_file():
        raise ValueError(f"{where}: no adapter_config.json (expected a PEFT LoRA adapter directory)")
    try:
        conf = json.loads(conf_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise ValueError(f"{where}: adapter_config.json holds {type(conf).__name__}, not an object")
    return conf


def load_peft_adapter(req: LoRARequest, cfg: ModelConfig, max_rank: int) -> HostAdapter:
    """Read a PEFT LoRA adapter directory for this model; anything it cannot serve exactly
    (DoRA, biases, extra trained modules, per-module rank patterns, embedding or LM-head
    adapters, a rank above max_rank, shapes that do not fit the model) raises ValueError."""
    path = Path(req.lora_path)
    where = f"LoRARequest({req.lora_name!r}) {path}"
    conf = read_adapter_config(path, where)
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type={conf.get('peft_type')!r}; only LORA adapters are supported")
    for key, ok in (("use_dora", (False, None)), ("bias", ("none", None)), ("modules_to_save", (None, [])),
                    ("rank_pattern", (None, {})), ("alpha_pattern", (None, {})), ("fan_in_fan_out", (False, None))):
        if conf.get(key) not in ok:
            raise ValueError(f"{where}: {key}={conf[key]!r} is not supported (supported: {ok[0]!r})")
    r, alpha = conf.get("r"), conf.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{where}: adapter_config.json needs an integer r >= 1 and a numeric lora_alpha "
                         f"(got r={r!r}, lora_alpha={alpha!r})")
    if r > max_rank:
        raise ValueError(f"{where}: rank r={r} exceeds max_lora_rank={max_rank}; raise max_lora_rank")
    scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ValueError(f"{where}: no adapter_model.safetensors (adapter_model.bin is not read; save the adapter "
                         "with safe_serialization=True)")
    from safetensors import SafetensorError
    from safetensors.flax import load_file  # bf16 / f16 adapters too (numpy has no bfloat16)
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: adapter_model.safetensors cannot be read ({e})") from None
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        if ".experts." in name or ".shared_expert." in name:
            raise ValueError(f"{where}: tensor {name!r} adapts a mixture-of-experts layer's experts; LoRA "
                             "adapters of a MoE layer may target its attention projections (q/k/v/o_proj) only")
        m = _KEY.match(name)
        if m is None or m.group(2) not in MODULE_FIELD:
            raise ValueError(f"{where}: tensor {name!r} is not a LoRA A/B matrix of a supported module "
                             f"({sorted(MODULE_FIELD)} of model.layers.N)")
        layer, module = int(m.group(1)), m.group(2)
        if module not in model_modules(cfg):
            raise ValueError(f"{where}: tensor {name!r} adapts {module}, which {cfg.architecture} does not have "
                             f"(its modules: {', '.join(model_modules(cfg))})")
        if layer >= cfg.num_layers:
            raise ValueError(f"{where}: tensor {name!r} is for layer {layer}; the model has {cfg.num_layers}")
        found.setdefault((layer, module), {})[m.group(3)] = np.asarray(t.astype(jnp.float32))
    if not found:
        raise ValueError(f"{where}: adapter_model.safetensors holds no LoRA matrices")
    layers: list[dict] = [dict.fromkeys(layer_fields(cfg, i)) for i in range(cfg.num_layers)]
    for (layer, module), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: layer {layer} {module} has lora_{''.join(ab)} without its pair")
        field, subs = MODULE_FIELD[module]
        if field not in layers[layer]:
            raise ValueError(f"{where}: layer {layer} is a mixture-of-experts layer, which has no {module} to adapt "
                             "(adapters of its attention projections are served)")
        din, outs = field_dims(cfg, field)
        a, b = ab["A"], ab["B"]
        widths = [outs[sub] for sub in subs]
        if a.shape != (r, din) or b.shape != (sum(widths), r):
            raise ValueError(f"{where}: layer {layer} {module}: lora_A {a.shape} / lora_B {b.shape}, expected "
                             f"({r}, {din}) / ({sum(widths)}, {r}) for r={r} and this model")
        if layers[layer][field] is None:
            layers[layer][field] = _zeros(cfg, field, max_rank)
        fa, fb = layers[layer][field]
        for sub, rows in zip(subs, np.split(b, np.cumsum(widths)[:-1])):
            fa[:, sub * max_rank:sub * max_rank + r] = a.T
            fb[sub][:r] = rows.T * scale
    return HostAdapter(req, layers)


def _zeros(cfg: ModelConfig, field: str, rank: int):
    """A slot's arrays of field, all zero (float32)."""
    din, outs = field_dims(cfg, field)
    return np.zeros((din, len(outs) * rank), np.float32), tuple(np.zeros((rank, o), np.float32) for o in outs)


@struct.dataclass
class LoraWeight:
    """A projection with the device's adapters beside it; `layers.matmul` adds the masked
    low-rank product. mask [B, S*R]: the columns of each row's adapter slot."""

    base: object
    a: jax.Array  # [Din, M*S*R]
    b: tuple  # M x [S*R, Dout_m]
    mask: jax.Array  # [B, S*R] float32

    def delta(self, x: jax.Array) -> jax.Array:
        """concat_m(((x a)_m * mask) b_m) for x [B, ..., Din], float32."""
        xa = jax.lax.dot_general(x, self.a.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # [B, ..., M*S*R]
        mask = self.mask.reshape(self.mask.shape[:1] + (1,) * (x.ndim - 2) + self.mask.shape[1:])
        sr = self.mask.shape[1]
        parts = [jax.lax.dot_general(xa[..., m * sr:(m + 1) * sr] * mask, b.astype(jnp.float32),
                                     (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
                 for m, b in enumerate(self.b)]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


@struct.dataclass
class LoRAArrays:
    """The device adapters: per layer, field -> (a [Din, M*S*R], (b_m [S*R, Dout_m], ...))."""

    layers: list
    num_slots: int = struct.field(pytree_node=False)


def with_lora(weights, lora: LoRAArrays, row_slots: jax.Array):
    """weights with every projection wrapped in a `LoraWeight` over the device adapters; row_slots
    [B]: each row's slot, 1..S (0: no adapter)."""
    sr = lora.layers[0]["wo"][1][0].shape[0]  # S*R: every projection's b_m has as many rows
    col_slot = jnp.arange(sr) // (sr // lora.num_slots) + 1
    mask = (col_slot[None, :] == row_slots[:, None]).astype(jnp.float32)  # [B, S*R]
    layers = [layer.replace(**{field: LoraWeight(getattr(layer, field), a, b, mask) for field, (a, b) in arrays.items()})
              for layer, arrays in zip(weights.layers, lora.layers)]
    return weights.replace(layers=layers)


@jax.jit
def _set_slot(lora: LoRAArrays, slot: jax.Array, adapter: list[dict]) -> LoRAArrays:
    """lora with slot (0-based) holding adapter (`HostAdapter.layers`, zeros where it has none)."""
    def put(dst, src):
        a, bs = dst
        sa, sbs = src
        rank = sbs[0].shape[0]
        for m in range(len(bs)):  # sub-module m's columns of a: (m*S + slot)*R ..
            a = jax.lax.dynamic_update_slice(a, sa[:, m * rank:(m + 1) * rank].astype(a.dtype),
                                             (0, (m * lora.num_slots + slot) * rank))
        bs = tuple(jax.lax.dynamic_update_slice(b, sb.astype(b.dtype), (slot * rank, 0)) for b, sb in zip(bs, sbs))
        return a, bs
    return lora.replace(layers=[{f: put(dst[f], src[f]) for f in dst} for dst, src in zip(lora.layers, adapter)])


class LoRAManager:
    """The adapters on device (num_slots of them) and on the host (an LRU of loaded ones)."""

    def __init__(self, cfg: ModelConfig, config: LoRAConfig, dtype):
        self.cfg, self.config = cfg, config
        s, r = config.max_loras, config.max_lora_rank
        layers = []
        for i in range(cfg.num_layers):
            layer = {}
            for field in layer_fields(cfg, i):
                din, outs = field_dims(cfg, field)
                layer[field] = (jnp.zeros((din, len(outs) * s * r), dtype),
                                tuple(jnp.zeros((s * r, o), dtype) for o in outs))
            layers.append(layer)
        self.arrays = LoRAArrays(layers, s)
        self.host: OrderedDict[int, HostAdapter] = OrderedDict()  # lora_int_id -> adapter, LRU order
        self.slots: list[int | None] = [None] * s  # lora_int_id held by each device slot
        self.num_loads = 0  # adapters written into a device slot

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self.arrays))

    def register(self, req: LoRARequest) -> HostAdapter:
        """Load (or find) req's adapter on the host; the boundary check of a LoRARequest."""
        known = self.host.get(req.lora_int_id)
        if known is not None:
            if Path(known.request.lora_path) != Path(req.lora_path):
                raise ValueError(f"lora_int_id={req.lora_int_id} is already {known.request.lora_path!r}; "
                                 f"{req.lora_path!r} needs another id")
            self.host.move_to_end(req.lora_int_id)
            return known
        adapter = load_peft_adapter(req, self.cfg, self.config.max_lora_rank)
        self.host[req.lora_int_id] = adapter
        limit = self.config.max_cpu_loras or self.config.max_loras
        for lid in list(self.host):
            if len(self.host) <= limit:
                break
            if lid not in self.slots and lid != req.lora_int_id:
                del self.host[lid]  # reloaded from its directory if asked for again
        return adapter

    def slot_of(self, lora_id: int) -> int:
        """The device slot (1-based) holding adapter lora_id (after `activate`); 0 for no adapter."""
        return self.slots.index(lora_id) + 1 if lora_id else 0

    def activate(self, requests):
        """Put the adapters of a step's requests (`EngineRequest.lora_request`) into device slots,
        loading the missing ones over slots no request of the step uses. The scheduler keeps the
        running requests to at most max_loras distinct adapters."""
        wanted = []
        for r in requests:
            if r.lora_request is not None and r.lora_request.lora_int_id not in wanted:
                wanted.append(r.lora_request.lora_int_id)
        free = [i for i, lid in enumerate(self.slots) if lid not in wanted]
        for r in requests:
            req = r.lora_request
            if req is None or req.lora_int_id in self.slots:
                continue
            slot = free.pop(0)  # the scheduler guarantees one
            adapter = self.register(req)
            dense = [{f: v if v is not None else _zeros(self.cfg, f, self.config.max_lora_rank)
                      for f, v in layer.items()} for layer in adapter.layers]
            self.arrays = _set_slot(self.arrays, jnp.int32(slot), dense)
            self.slots[slot] = req.lora_int_id
            self.num_loads += 1
