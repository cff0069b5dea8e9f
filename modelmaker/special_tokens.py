"""The special tokens every made tokenizer has, and the chat template written in them."""

from __future__ import annotations

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# BpeTrainer gives these the first ids, in order: unk/bos/eos get Llama's 0/1/2, so ids in logs
# and tests look familiar.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *ROLE_TOKENS)

# Tools in the Hermes/Qwen format: their JSON schemas in a system turn, each
# call the model makes (and each call in the history) a
# <tool_call>{"name": ..., "arguments": {...}}</tool_call> block, each result
# a "tool" turn (router/tools.py parses the calls with `--tool-call-parser
# hermes`).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|system|>\nYou may call one or more of these tools. To call one, answer "
    '<tool_call>{"name": <name>, "arguments": <arguments>}</tool_call>.\n<tools>\n\' }}'
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools>' + eos_token + '\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set args = call['function']['arguments'] %}"
    "{{ '<tool_call>{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' }}"
    "{{ args if args is string else args | tojson }}{{ '}</tool_call>' }}"
    "{% endfor %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
