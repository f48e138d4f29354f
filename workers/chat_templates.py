"""Chat templates for models that ship none (FastChat's conversation formats), and ``--chat-template FILE|NAME``.

Each is a Jinja template as Hugging Face tokenizers run them (``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``). A system message,
where a format has no place for one, goes where that format's authors put it
(Llama 2 and Mistral: inside the first instruction).
"""

from __future__ import annotations

from pathlib import Path

#: A leading system message, split off: ``system`` (its text, or "") and ``turns`` (the rest).
_SYSTEM = ("{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
           "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}")

TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama-2": _SYSTEM + (
        "{% for m in turns %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
        "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}{{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
    ),
    "vicuna": _SYSTEM + (
        "{{ system or 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user\\'s questions.' }}"
        "{% for m in turns %}{% if m['role'] == 'user' %} USER: {{ m['content'] }}"
        "{% elif m['role'] == 'assistant' %} ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    ),
    "alpaca": _SYSTEM + (
        "{{ system or 'Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.' }}\n\n"
        "{% for m in turns %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    "mistral": _SYSTEM + (
        "{{ bos_token }}{% for m in turns %}{% if m['role'] == 'user' %}[INST] "
        "{% if loop.first and system %}{{ system }}\n\n{% endif %}{{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "zephyr": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
}


def chat_template(value: str) -> str:
    """``--chat-template``: a name from ``TEMPLATES``, or the path of a Jinja file."""
    if value in TEMPLATES:
        return TEMPLATES[value]
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    raise ValueError(f"--chat-template {value!r} is neither a file nor one of: {', '.join(TEMPLATES)}")
