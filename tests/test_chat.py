"""Chat templates render as transformers renders them; LLM.chat generates from those prompts."""

import json
import shutil

import pytest

from jaxinfer import LLM, SamplingParams
from jaxinfer.llm import resolve_model

# ChatML with tools (Qwen2-style), written over indented lines as real templates are (trim_blocks
# and lstrip_blocks decide the whitespace): a default system turn, tojson of the tools.
CHATML = """{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are helpful.' }}
    {%- endif %}
    {{- '\n# Tools\n' }}
    {%- for tool in tools %}
{{ tool | tojson }}
    {% endfor %}
<|im_end|>
{% elif messages[0]['role'] != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
{% endif %}
{% for message in messages %}
    {% if not (tools and loop.first and message['role'] == 'system') %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
# Llama-2-style: the BOS token from the config, strict alternation enforced with raise_exception,
# whitespace control, a {% generation %} block.
LLAMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Write a function that adds two numbers."}],
    [{"role": "system", "content": "Answer in Python. Ünïcode stays."},
     {"role": "user", "content": "def add(a, b):"},
     {"role": "assistant", "content": "    return a + b"},
     {"role": "user", "content": [{"type": "text", "text": "Now subtract."}]}],
]
TOOLS = [{"type": "function", "function": {"name": "run", "description": "Run code: ✓",
                                           "parameters": {"type": "object", "properties": {"code": {"type": "string"}}}}}]


def _tokenizer_dir(tmp_path, template, jinja_file=False):
    src = resolve_model(None)
    out = tmp_path / "tok"
    out.mkdir()
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    if jinja_file:
        (out / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512)


@pytest.mark.parametrize("template,jinja_file", [(CHATML, False), (LLAMA, True),
                                                 ([{"name": "default", "template": CHATML},
                                                   {"name": "tool_use", "template": CHATML.replace("# Tools", "## T")}],
                                                  False)], ids=["chatml_tools", "llama2_jinja_file", "named"])
def test_prompts_and_ids_match_transformers(tmp_path, template, jinja_file):
    from transformers import AutoTokenizer

    from jaxinfer.tokenizer import Tokenizer
    path = _tokenizer_dir(tmp_path, template, jinja_file)
    hf = AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_dir(path)
    cases = [{"add_generation_prompt": True}, {"add_generation_prompt": False},
             {"add_generation_prompt": False, "continue_final_message": True}]
    if template is not LLAMA:
        cases.append({"add_generation_prompt": True, "tools": TOOLS})
    checked = 0
    for conversation in CONVERSATIONS + [CONVERSATIONS[1][:3]]:
        if template is LLAMA and conversation[0]["role"] == "system":
            conversation = conversation[1:]
        # Text parts are joined into a string first, as vLLM does for string templates
        # (transformers would hand the template the list itself).
        flat = [{**m, "content": m["content"][0]["text"]} if isinstance(m["content"], list) else m
                for m in conversation]
        for kw in cases:
            want = hf.apply_chat_template(flat, tokenize=False, **kw)
            assert ours.apply_chat_template(conversation, tokenize=False, **kw) == want, kw
            ids = hf(want, add_special_tokens=False)["input_ids"]
            assert ours.apply_chat_template(conversation, **kw) == ids
            checked += 1
    assert checked >= 8


def test_llm_chat_generates_from_the_rendered_prompt(tmp_path, llm):
    path = _tokenizer_dir(tmp_path, CHATML)
    chat_llm = LLM(max_model_len=512, tokenizer=str(path))
    params = SamplingParams(temperature=0, max_tokens=12)
    outs = chat_llm.chat(CONVERSATIONS, params)
    assert len(outs) == 2
    for out, conversation in zip(outs, CONVERSATIONS, strict=True):
        text = chat_llm.get_tokenizer().apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert out.prompt == text and text.endswith("<|im_start|>assistant\n")
        ref = llm.generate([{"prompt_token_ids": out.prompt_token_ids}], params)[0]
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids and len(ref.outputs[0].token_ids) > 0
    # one conversation (not a list of them), an explicit template, continue_final_message
    (one,) = chat_llm.chat(CONVERSATIONS[0] + [{"role": "assistant", "content": "def add("}], params,
                           add_generation_prompt=False, continue_final_message=True)
    assert one.prompt.endswith("<|im_start|>assistant\ndef add(")
    (own,) = llm.chat(CONVERSATIONS[0], params, chat_template="{% for m in messages %}# {{ m.content }}\n{% endfor %}")
    assert own.prompt == "# Write a function that adds two numbers.\n"


def test_chat_errors_name_the_problem(tmp_path, llm):
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat(CONVERSATIONS[0])
    path = _tokenizer_dir(tmp_path, LLAMA)
    strict = LLM(max_model_len=512, tokenizer=str(path))
    with pytest.raises(ValueError, match="roles must alternate"):
        strict.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    for bad, match in [([{"content": "no role"}], r"messages\[0\]"), ([], "non-empty"),
                       ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
                       ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\]")]:
        with pytest.raises(ValueError, match=match):
            strict.chat(bad)
    with pytest.raises(ValueError, match="cannot both be True"):
        strict.chat(CONVERSATIONS[0], continue_final_message=True)
    with pytest.raises(ValueError, match="does not parse"):
        strict.chat(CONVERSATIONS[0], chat_template="{% for m in messages %}")
    assert strict.engine.has_unfinished_requests() is False
