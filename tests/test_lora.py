"""LoRA adapters per request: outputs match PEFT's model for every adapter when base and adapter
requests share batches, device slots and cached prefixes; bad adapters are refused at the boundary."""

import json
import shutil

import numpy as np
import peft
import pytest
import torch
from hf_models import load_hf_model, write_tiny
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch

from jaxinfer import LLM, LoRARequest, SamplingParams

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [1, 5, 9, 33, 7, 21, 60, 3, 44, 12, 90, 17]


def _adapter(base, out, seed: int, **config):
    """A PEFT adapter of the base model with random (nonzero) A and B, saved to out."""
    model = peft.get_peft_model(load_hf_model(base), peft.LoraConfig(lora_dropout=0.0, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny("llama", root / "base")
    refs = {None: load_hf_model(base),
            1: _adapter(base, root / "a1", 1, r=4, lora_alpha=8, target_modules=ALL),
            2: _adapter(base, root / "a2", 2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        use_rslora=True),
            3: _adapter(base, root / "a3", 3, r=2, lora_alpha=2, target_modules=["o_proj", "up_proj"])}
    requests = {i: LoRARequest(f"a{i}", i, str(root / f"a{i}")) for i in (1, 2, 3)}
    return root, base, refs, requests


def test_each_adapter_matches_peft_in_mixed_batches(models):
    """Base and three adapters (two device slots: the third waits for a slot, then replaces one)
    over one prompt, after the base request filled the prefix cache: every output's greedy tokens
    equal PEFT's generate and its prompt logprobs PEFT's log-softmax (1e-4, float32). Adapter
    K/V never serves another adapter's prefix (the cache keys carry the adapter)."""
    _, base, refs, requests = models
    llm = LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=8, block_size=4, max_model_len=64,
              num_scheduler_steps=4)  # decode-only steps run fused, with the adapters too
    sp = SamplingParams(temperature=0, max_tokens=10, prompt_logprobs=0, ignore_eos=True)
    which = [None, 1, 2, 3, 1, None]
    prompts = [{"prompt_token_ids": PROMPT}] * len(which)
    loras = [None if i is None else requests[i] for i in which]
    outs = llm.generate(prompts, sp, lora_request=loras)
    ids = torch.tensor([PROMPT])
    for i, out in zip(which, outs):
        with torch.no_grad():
            want = refs[i].generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
            lp = torch.log_softmax(refs[i](ids).logits[0].float(), -1).numpy()
        assert out.outputs[0].token_ids == want[0, len(PROMPT):].tolist(), i
        ours = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], PROMPT[1:])]
        np.testing.assert_allclose(ours, lp[np.arange(len(PROMPT) - 1), PROMPT[1:]], atol=1e-4)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 4  # the adapters do change the output
    # Again without prompt logprobs, so the prompt's cached pages are reused: each its adapter's own.
    again = llm.generate(prompts[::-1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                         lora_request=loras[::-1])
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs[::-1]]
    stats = llm.get_stats()
    assert stats.num_fused_steps > 0
    assert stats.num_lora_loads >= 3 and stats.prefix_cache_hits == len(which) * ((len(PROMPT) - 1) // 4)
    assert llm.engine.allocator.num_used == 0  # every page back in the pool (cached ones evictable)


def test_bad_adapters_are_refused_naming_the_problem(models, tmp_path):
    root, base, _, requests = models

    def variant(name, edit_config=None, extra_tensor=None, raw_weights=None):
        d = tmp_path / name
        shutil.copytree(root / "a1", d)
        if raw_weights is not None:
            (d / "adapter_model.safetensors").write_bytes(raw_weights)
        if edit_config:
            conf = json.loads((d / "adapter_config.json").read_text())
            conf.update(edit_config)
            (d / "adapter_config.json").write_text(json.dumps(conf))
        if extra_tensor:
            t = load_file(str(d / "adapter_model.safetensors"))
            t[extra_tensor] = np.zeros((4, 64), np.float32)
            save_file(t, str(d / "adapter_model.safetensors"))
        return LoRARequest(name, 10 + len(name), str(d))

    llm = LLM(str(base), enable_lora=True, max_loras=1, max_lora_rank=4, block_size=4, max_model_len=64)
    prompt = [{"prompt_token_ids": PROMPT}]
    cases = [
        (LoRARequest("gone", 20, str(tmp_path / "missing")), "no adapter_config.json"),
        (requests[2], "r=8 exceeds max_lora_rank=4"),
        (variant("dora", {"use_dora": True}), "use_dora=True is not supported"),
        (variant("head", extra_tensor="base_model.model.lm_head.lora_A.weight"), "lm_head.lora_A"),
        (variant("torn", raw_weights=b"garbage"), "adapter_model.safetensors cannot be read"),
        (variant("wide", {"r": 3}), r"down_proj: lora_A \(4, 96\) / lora_B \(64, 4\), expected \(3, 96\)"),
        (LoRARequest("a1-elsewhere", 1, str(tmp_path)), "lora_int_id=1 is already"),
    ]
    llm.generate(prompt, SamplingParams(max_tokens=1), lora_request=requests[1])  # id 1 -> a1
    for req, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt * 2, SamplingParams(max_tokens=2), lora_request=[requests[1], req])
        assert not llm.engine.has_unfinished_requests()  # nothing half-queued
    with pytest.raises(ValueError, match="lora_int_id=0 must be an integer >= 1"):
        LoRARequest("x", 0, str(root / "a1"))
    with pytest.raises(ValueError, match="got 2 lora_request entries for 1 prompts"):
        llm.generate(prompt, lora_request=[requests[1]] * 2)
    with pytest.raises(ValueError, match="enable_lora=True"):
        LLM(str(base), block_size=4, max_model_len=64).generate(prompt, lora_request=requests[1])
    assert len(llm.generate(prompt, SamplingParams(max_tokens=2), lora_request=requests[1])[0].outputs[0].token_ids) == 2
    # An adapter saved in bfloat16 (as PEFT saves one trained in bf16) reads like the float32 one, rounded.
    f32 = load_file(str(root / "a1" / "adapter_model.safetensors"))
    half = tmp_path / "bf16"
    shutil.copytree(root / "a1", half)
    save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in f32.items()},
               str(half / "adapter_model.safetensors"))
    got = llm.engine.lora.register(LoRARequest("bf16", 30, str(half))).layers[0]["wqkv"][0]
    want = llm.engine.lora.register(requests[1]).layers[0]["wqkv"][0]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)


def _matches_peft(llm, ref, request, sp):
    """PROMPT through llm with request's adapter (sp: 8 greedy tokens with prompt logprobs): the tokens
    and prompt logprobs (1e-4) of PEFT's model ref. Returns (our output, our prompt logprobs)."""
    out = llm.generate({"prompt_token_ids": PROMPT}, sp, lora_request=request)[0]
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        lp = torch.log_softmax(ref(ids).logits[0].float(), -1).numpy()
    assert out.outputs[0].token_ids == want[0, len(PROMPT):].tolist()
    ours = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], PROMPT[1:])]
    np.testing.assert_allclose(ours, lp[np.arange(len(PROMPT) - 1), PROMPT[1:]], atol=1e-4)
    return out, ours


def test_moe_models_serve_attention_adapters_as_peft_does(tmp_path):
    """A Mixtral with a PEFT adapter of its attention projections: greedy tokens and prompt logprobs
    equal PEFT's. An adapter that also adapts an expert (as PEFT saved them when experts were Linear
    modules) is refused at the request, naming the tensor, and the engine goes on serving."""
    base = write_tiny("mixtral", tmp_path / "base")
    ref = _adapter(base, tmp_path / "attn", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    shutil.copytree(tmp_path / "attn", tmp_path / "experts")
    tensors = load_file(str(tmp_path / "attn" / "adapter_model.safetensors"))
    expert = "base_model.model.model.layers.0.block_sparse_moe.experts.1.w1.lora_"
    tensors.update({expert + "A.weight": np.zeros((4, 64), np.float32), expert + "B.weight": np.zeros((96, 4), np.float32)})
    save_file(tensors, str(tmp_path / "experts" / "adapter_model.safetensors"))
    llm = LLM(str(base), enable_lora=True, max_lora_rank=4, max_model_len=64)
    sp = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)
    out, ours = _matches_peft(llm, ref, LoRARequest("attn", 1, str(tmp_path / "attn")), sp)
    plain = llm.generate({"prompt_token_ids": PROMPT}, sp)[0]
    assert plain.outputs[0].token_ids != out.outputs[0].token_ids or not np.allclose(
        [d[t].logprob for d, t in zip(plain.prompt_logprobs[1:], PROMPT[1:])], ours, atol=1e-3)
    with pytest.raises(ValueError, match="experts.*attention projections"):
        llm.generate({"prompt_token_ids": PROMPT}, sp, lora_request=LoRARequest("x", 2, str(tmp_path / "experts")))
    assert llm.generate({"prompt_token_ids": PROMPT}, sp)[0].outputs[0].token_ids == plain.outputs[0].token_ids


@pytest.mark.parametrize("arch, modules, foreign", [
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ("llama", "q_proj", "qkv_proj")),
    ("starcoder2", ["q_proj", "v_proj", "o_proj", "c_fc", "c_proj"], ("llama", "gate_proj", "c_fc")),
    ("gpt_neox", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
     ("llama", "q_proj", "query_key_value")),
    ("phi", ["q_proj", "v_proj", "dense", "fc1", "fc2"], ("llama", "gate_proj", "fc1")),
    ("glm4", ["q_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"], ("llama", "gate_proj", "gate_up_proj")),
])
def test_adapters_of_other_module_layouts_match_peft(tmp_path, arch, modules, foreign):
    """Phi-3's adapters target its fused qkv_proj and gate_up_proj (served as one A shared by the
    field's parts and B's rows split among them); StarCoder2's its ungated MLP's c_fc and c_proj;
    GPT-NeoX's its per-head query_key_value, dense, dense_h_to_4h and dense_4h_to_h; Phi-2's its
    dense, fc1 and fc2; GLM-4's its fused gate_up_proj beside separate q / k / v.
    Greedy tokens and prompt logprobs equal PEFT's. An adapter of a module the model does not
    have (a Llama's) is refused at the request, naming it and the model's modules."""
    base = write_tiny(arch, tmp_path / "base")
    ref = _adapter(base, tmp_path / "fused", 1, r=4, lora_alpha=8, target_modules=modules)
    other, module, listed = foreign
    _adapter(write_tiny(other, tmp_path / other), tmp_path / "split", 2, r=4, lora_alpha=8, target_modules=[module])
    llm = LLM(str(base), enable_lora=True, max_lora_rank=4, max_model_len=64)
    sp = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)
    _, ours = _matches_peft(llm, ref, LoRARequest("fused", 1, str(tmp_path / "fused")), sp)
    plain = llm.generate({"prompt_token_ids": PROMPT}, sp)[0]
    assert not np.allclose([d[t].logprob for d, t in zip(plain.prompt_logprobs[1:], PROMPT[1:])], ours, atol=1e-3)
    with pytest.raises(ValueError, match=f"adapts {module}, which {type(ref.base_model.model).__name__} does not "
                                         f"have.*{listed}"):
        llm.generate({"prompt_token_ids": PROMPT}, sp, lora_request=LoRARequest("split", 2, str(tmp_path / "split")))
    assert llm.generate({"prompt_token_ids": PROMPT}, sp)[0].outputs[0].token_ids == plain.outputs[0].token_ids
