"""Chat templates: conversations rendered into prompts as Hugging Face tokenizers render them.

A checkpoint's template is the Jinja source in `chat_template.jinja` or in tokenizer_config.json's
"chat_template" (a string, or a list of {"name", "template"} entries: "default", "tool_use", ...).
`render_chat` runs it the way transformers' `apply_chat_template` does, so a prompt built here
tokenizes to the same ids: a sandboxed Jinja environment with trim_blocks and lstrip_blocks, the
`loopcontrols` extension, `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that
keeps non-ASCII characters, and the tokenizer's special tokens (bos_token, eos_token, ...) as
variables beside messages, tools, add_generation_prompt and any extra keyword arguments.
The rendered text is tokenized without adding special tokens: the template writes its own.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def load_chat_template(model_dir: str | Path) -> tuple[str | dict[str, str] | None, dict[str, str]]:
    """(template, special tokens) of a tokenizer directory. template: the Jinja source, a dict of
    named sources, or None when the directory has none; special tokens: {"bos_token": "<s>", ...}
    as tokenizer_config.json spells them (strings or {"content": ...} entries)."""
    model_dir = Path(model_dir)
    config, template = {}, None
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        template = config.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():  # transformers >= 4.43 saves the template beside the config
        template = jinja.read_text()
    special = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    return template, special


def select_template(template: str | dict[str, str] | None, chat_template: str | None, tools,
                    where: str) -> str:
    """The Jinja source to render: an explicit chat_template (source text, or the name of one of the
    checkpoint's named templates), else the checkpoint's ("tool_use" when tools are given and it
    has one, else "default")."""
    if chat_template is not None:
        if isinstance(template, dict) and chat_template in template:
            return template[chat_template]
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ValueError(f"chat_template={chat_template!r}: pass Jinja source text or the name of one of "
                             f"the model's templates")
        return chat_template
    if template is None:
        raise ValueError(f"{where} has no chat template (tokenizer_config.json 'chat_template' or "
                         "chat_template.jinja); pass chat_template=<Jinja source>")
    if isinstance(template, dict):
        name = "tool_use" if tools and "tool_use" in template else "default"
        if name not in template:
            raise ValueError(f"{where} has named chat templates {sorted(template)} and no 'default'; "
                             "pass chat_template=<name>")
        return template[name]
    return template


def validate_messages(messages) -> list[dict]:
    """A conversation as a list of {"role": str, "content": str | [text parts] | None, ...}; text parts
    ({"type": "text", "text": ...}) are joined with newlines, as vLLM does for string templates."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages={messages!r}: expected a non-empty list of {{'role', 'content'}} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}]={m!r}: expected a dict with a string 'role'")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"messages[{i}] content part {part!r}: only text parts "
                                     "({'type': 'text', 'text': str}) are supported")
                texts.append(part["text"])
            m = {**m, "content": "\n".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content']={content!r}: expected a string, a list of text parts "
                             "or None")
        out.append(m)
    return out


def _environment():
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it for
        training masks): rendered as its body."""
        tags = frozenset({"generation"})

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", GenerationBlock])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


_COMPILED: dict[str, object] = {}


def render_chat(template: str, messages, *, special_tokens: dict[str, str] | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: list[dict] | None = None, **kwargs) -> str:
    """The prompt text of one conversation. continue_final_message: leave the last message open
    (the model continues it): the text ends where that message's content ends."""
    import jinja2
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be True")
    messages = validate_messages(messages)
    if template not in _COMPILED:
        try:
            _COMPILED[template] = _environment().from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not parse: {e.message} (line {e.lineno})") from None
    try:
        text = _COMPILED[template].render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                          **(special_tokens or {}), **kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template refused the conversation: {e}") from None
    if continue_final_message:
        final = (messages[-1].get("content") or "").strip()
        if final not in text:
            raise ValueError("continue_final_message: the final message's content does not appear in the "
                             "rendered prompt")
        text = text[:text.rindex(final) + len(final)]
    return text
