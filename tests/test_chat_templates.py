"""Named chat templates render a fixed conversation exactly as their formats are published, and a model with no
template of its own chats through the gateway with ``--chat-template``."""

from __future__ import annotations

import pytest
from test_hf_worker import plain_dir, serve  # noqa: F401  (plain_dir is a fixture)

from workers.chat_templates import TEMPLATES, chat_template
from workers.tiny_model import train_tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]
#: The tiny tokenizer's BOS and EOS are <|bos|> and <|eos|> (a Llama tokenizer's would be <s> and </s>).
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n",
    "llama-2": "<|bos|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! <|eos|><|bos|>[INST] How are you? "
               "[/INST]",
    "vicuna": "Be brief. USER: Hi ASSISTANT: Hello!<|eos|> USER: How are you? ASSISTANT:",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!<|eos|>\n\n### Instruction:\nHow are you?\n\n"
              "### Response:\n",
    "mistral": "<|bos|>[INST] Be brief.\n\nHi [/INST]Hello!<|eos|>[INST] How are you? [/INST]",
    "zephyr": "<|system|>\nBe brief.<|eos|>\n<|user|>\nHi<|eos|>\n<|assistant|>\nHello!<|eos|>\n<|user|>\n"
              "How are you?<|eos|>\n<|assistant|>\n",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_each_named_template_renders_its_format(name):
    tok = train_tokenizer()
    assert tok.apply_chat_template(CONVERSATION, chat_template=chat_template(name), tokenize=False,
                                   add_generation_prompt=True) == EXPECTED[name]


def test_without_a_system_message_the_formats_use_their_defaults():
    tok = train_tokenizer()
    turns = CONVERSATION[1:2]
    render = {n: tok.apply_chat_template(turns, chat_template=t, tokenize=False, add_generation_prompt=True)
              for n, t in TEMPLATES.items()}
    assert render["vicuna"].startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert render["alpaca"].startswith("Below is an instruction that describes a task.")
    assert render["llama-2"] == "<|bos|>[INST] Hi [/INST]"


def test_a_template_file_or_a_clear_error(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    assert chat_template(str(path)) == path.read_text()
    with pytest.raises(ValueError, match="chatml"):
        chat_template("no-such-template")


async def test_a_model_without_a_template_chats_with_a_named_one(stack, plain_dir):  # noqa: F811
    worker, client = await serve(stack, plain_dir, chat_template="chatml")
    msgs = [{"role": "user", "content": "Hi"}]
    r = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0)
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert r.usage.prompt_tokens == len(worker.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert r.choices[0].finish_reason == "length"
