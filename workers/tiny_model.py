"""A tiny random-weight chat model built offline in a second, so the HF engine is testable without downloads.

The tokenizer is a real byte-level BPE trained here on a few English
paragraphs (so multi-byte characters span several tokens, as in real models)
and carries a chat template; the model is a 2-layer Llama with fixed-seed
random weights, so its greedy output is deterministic but meaningless.

    python -m workers.tiny_model DIR
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

#: Each turn is ``<|role|>`` + content + ``<|eos|>``; the model answers after ``<|assistant|>``. Tools are
#: listed in a system turn first; an assistant's calls follow its content Hermes-style
#: (``<tool_call>{"name", "arguments"}</tool_call>``), and a tool's result is a ``<|tool|>`` turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nYou may call these tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|eos|>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A model worker reads jobs from a stream, runs them,
and publishes every token back to the gateway that asked. The gateway speaks the OpenAI API, so any
client that knows that API works unchanged. When a worker dies its record simply expires, and the
dispatcher stops choosing it within a few seconds. Requests that arrive together are batched: one
forward pass serves every sequence that is running, which is why throughput grows with concurrency.
Hello there! How are you today? I am fine, thank you. What is the weather like in Paris, Berlin and
Tokyo? It is sunny, with a light breeze from the west. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Café, naïve, résumé, São Paulo, Zürich — and a smile 🙂 for good measure.
"""

VOCAB_SIZE = 640
SEED = 1234


def train_tokenizer(vocab_size: int = VOCAB_SIZE):  # -> PreTrainedTokenizerFast
    """A byte-level BPE trained on ``CORPUS``: every byte is in the alphabet, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # A plain prompt (completions) starts with <|bos|>, like the chat template's first token.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, model_max_length=256,
    )


def build_tiny_model(directory: str | Path, *, chat_template: bool = True, context_length: int = 256,
                     suppress_eos: bool = True, seed: int = SEED) -> Path:
    """Write tokenizer + model to ``directory`` (created if needed) and return it.

    ``chat_template=False`` leaves the template out, for serving a completions-only model.
    ``seed`` draws the random weights (another seed: another model, with the same tokenizer).
    ``suppress_eos`` zeroes the output row of ``<|eos|>``, so its logit (0) sits far below the
    peaked random ones: greedy replies then always run to ``max_tokens`` (what tests and
    benchmarks want), while sampled ones still end by themselves now and then.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.model_max_length = context_length
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        # Wider than the default 0.02 so the untrained logits are peaked, not near-uniform.
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):  # a fixed seed without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if suppress_eos:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] = 0  # logit 0, far below the peaked random ones
    model.generation_config.do_sample = False
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_lora(base: str | Path, directory: str | Path, *, seed: int = 7, rank: int = 4) -> Path:
    """A PEFT LoRA adapter for the tiny model at ``base``, with random weights that change its answers (a
    freshly made adapter is a no-op: its B matrices start at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = Path(directory)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapted = get_peft_model(model, config)
    adapted.save_pretrained(str(path))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="Where to write the model (created if missing).")
    parser.add_argument("--no-chat-template", action="store_true", help="Leave the chat template out.")
    parser.add_argument("--context-length", type=int, default=256, help="max_position_embeddings [default 256].")
    parser.add_argument("--allow-eos", action="store_true", help="Keep <|eos|> as likely as random weights make it.")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.directory, chat_template=not args.no_chat_template,
                            context_length=args.context_length, suppress_eos=not args.allow_eos)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
