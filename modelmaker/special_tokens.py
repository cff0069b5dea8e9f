"""The special tokens every made tokenizer has, and the chat template written in them."""

from __future__ import annotations

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# BpeTrainer gives these the first ids, in order: unk/bos/eos get Llama's 0/1/2, so ids in logs
# and tests look familiar.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
