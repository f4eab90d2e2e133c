"""Chat templates: `chat_template:` in a recipe is `auto`, one of the built-in names below, or a Jinja template.

The built-in templates render, through transformers' `apply_chat_template`, exactly the text that mergekit 0.1.5's
templates of the same names render (tests/test_tokenizer.py compares them on a set of conversations), whitespace
included: llama3 ends every turn with a newline and exaone indents as mergekit's do.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from composer.recipe_errors import suggest

BUILTIN = {
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (system | last).content | trim if system else '' }}\n"
        "{% for message in messages %}"
        "{% if message['role'] in ('user', 'assistant', 'user_context') %}"
        "{{ '\\n' }}### {{ {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'}[message['role']] }}:"
        "{{ '\\n' + message['content'] | trim }}"
        "{% if not loop.last %}{{ '\\n' }}{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
        "{{ '    [|' + message['role'] + '|]' + message['content'] + '\\n' }}"
        "{{ '        \\n\\n' if message['role'] == 'user' else '        [|endofturn|]\\n\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}"
        "{{ (bos_token if loop.first else '') + '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
        "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{{- bos_token }}"
        "{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        "{{- ' [INST] ' + (system_message + '\\n\\n' if loop.first and system_message is defined else '')"
        " + message['content'] + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
        "{%- else %}"
        "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!') }}"
        "{%- endif %}"
        "{%- endfor %}"
    ),
}


def _is_name(text: str) -> bool:
    """mergekit's rule: a short single line without '{' names a built-in template."""
    return len(text) < 256 and "\n" not in text and "{" not in text


def template_problem(text: str) -> str | None:
    """Why `chat_template: text` cannot be used, or None."""
    if text == "auto" or text in BUILTIN:
        return None
    if _is_name(text):
        return (f"chat_template '{text}' is not a built-in template{suggest(text, ['auto', *BUILTIN])} (built-in: "
                f"{', '.join(BUILTIN)}; or 'auto', or a Jinja template)")
    if len(text) < 20 or "{" not in text:
        return "chat_template is too short to be a Jinja template: give a template, a built-in name or 'auto'"
    return None


def resolve_template(text: str, templates: Iterable[str | None]) -> tuple[str | None, str]:
    """The template text `chat_template: text` stands for and how it was chosen; `templates` are the inputs'
    own templates in the recipe's order (for `auto`: the most common, stripped, ties to the first; None where no
    input has one)."""
    if text == "auto":
        found = [t.strip() for t in templates if t]
        if not found:
            return None, "auto: no input model has a chat template, so the output has none"
        chosen, count = Counter(found).most_common(1)[0]
        return chosen, f"auto: the template {count} of {len(found)} input template(s) share"
    if text in BUILTIN:
        return BUILTIN[text], f"built-in '{text}'"
    return text, "the recipe's own Jinja template"
