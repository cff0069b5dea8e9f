"""The router's TextAssembler (router/textstream.py), in process: text is
released as soon as it cannot be part of a stop string, never past one, and
the whole equals the offline engine's text for the same tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from router.responses import ChatFormat, CompletionFormat
from router.textstream import TextAssembler, prompt_token_infos


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(asm: TextAssembler, ids: list[int]) -> list[str]:
    """Push each token and take what is released after it."""
    out = []
    for i in ids:
        if asm.stopped:
            break
        asm.push(i, None)
        out.append(asm.take()[0])
    return out


def test_without_stop_strings_every_token_is_released_at_once(tok):
    ids = ids_of(tok, "the quick brown fox jumps over the lazy dog")
    asm = TextAssembler(tok, (), logprobs=False)
    pieces = stream(asm, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert asm.finish() == ("", [])


def test_text_that_may_begin_a_stop_string_is_held_back_then_cut(tok):
    ids = ids_of(tok, "one two three STOP four five")
    asm = TextAssembler(tok, ("STOP",), logprobs=False)
    pieces = stream(asm, ids)
    sent = "".join(pieces)
    assert asm.stopped and asm.stop_string == "STOP"
    rest, _ = asm.finish()
    assert sent + rest == "one two three "  # nothing of the stop string, nothing after it


def test_no_stop_string_ends_the_text_before_min_tokens(tok):
    ids = ids_of(tok, "one STOP two STOP three")
    asm = TextAssembler(tok, ("STOP",), logprobs=False, min_tokens=8)
    first_stop = next(k for k in range(len(ids)) if "STOP" in tok.decode(ids[: k + 1]))
    assert first_stop < 8  # the first one is within min_tokens: not a stop
    sent = "".join(stream(asm, ids))
    rest, _ = asm.finish()
    assert sent + rest == "one STOP two "


def test_a_stop_string_split_across_tokens_is_found(tok):
    text = "alpha beta gamma delta"
    ids = ids_of(tok, text)
    asm = TextAssembler(tok, ("ta gam",), logprobs=False)
    sent = "".join(stream(asm, ids))
    rest, _ = asm.finish()
    assert sent + rest == "alpha be"


def test_the_workers_stop_string_still_cuts_the_final_text(tok):
    # The worker matched a stop string the router's text did not show (it
    # cannot with the same tokenizer; the router still never sends past it).
    ids = ids_of(tok, "red green blue")
    last = tok.decode(ids[-1:], skip_special_tokens=True)
    asm = TextAssembler(tok, (), logprobs=False)
    for i in ids[:-1]:
        asm.push(i, None)
    head, _ = asm.take()
    asm.push(ids[-1], None, check_stop=False)
    rest, _ = asm.finish(worker_stop_string=last)
    assert head + rest == tok.decode(ids[:-1], skip_special_tokens=True)
    assert asm.stop_string == last


def test_logprob_entries_carry_each_token_and_its_offset(tok):
    ids = ids_of(tok, "hello there world")
    asm = TextAssembler(tok, (), logprobs=True)
    entries = []
    for n, i in enumerate(ids):
        asm.push(i, -0.5 * n)
        entries += asm.take()[1]
    entries += asm.finish()[1]
    assert [e.token_id for e in entries] == ids
    assert [e.logprob for e in entries] == [-0.5 * n for n in range(len(ids))]
    offsets = [e.offset for e in entries]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for e in entries:  # each token's own text is where its offset says
        assert asm.text[e.offset :].startswith(e.text)


def test_top_alternatives_are_decoded_and_shaped_as_openai_answers(tok):
    """Each token's alternatives decoded on their own; completions answer the
    sampled token first then the alternatives, chat the alternatives alone."""
    ids = ids_of(tok, "red green")[:2]
    asm = TextAssembler(tok, (), logprobs=True)
    alternatives = [(ids[1], -0.25), (ids[0], -1.5)]  # the sampled ids[0] is second
    asm.push(ids[0], -1.5, alternatives)
    asm.push(ids[1], -0.5)  # logprobs=0: none
    entries = asm.take()[1] + asm.finish()[1]
    texts = [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert entries[0].top == ((texts[1], -0.25), (texts[0], -1.5))
    assert entries[1].top == ()

    completion = CompletionFormat("id", 0, "m", logprobs=True)._logprobs(entries)
    assert completion is not None
    assert completion["top_logprobs"] == [{texts[0]: -1.5, texts[1]: -0.25}, {texts[1]: -0.5}]
    assert list(completion["top_logprobs"][0]) == texts  # the sampled token first
    chat = ChatFormat("id", 0, "m", logprobs=True)._logprobs(entries)
    assert chat is not None
    first, second = chat["content"]
    assert first["top_logprobs"] == [
        {"token": texts[1], "logprob": -0.25, "bytes": list(texts[1].encode())},
        {"token": texts[0], "logprob": -1.5, "bytes": list(texts[0].encode())},
    ]
    assert second["top_logprobs"] == []


def test_an_echoed_prompts_entries_come_first_and_offsets_run_on(tok):
    """echo with logprobs: one entry per prompt token (the first without a
    logprob or alternatives), offsets from 0 over the prompt's text, then
    the output's entries with offsets shifted by its length."""
    prompt = "hello there"
    ids = tok.encode(prompt)  # with the BOS token, as the router tokenizes
    scored = [(-1.0 * i, [(ids[1], -0.5)]) for i in range(1, len(ids))]
    entries = prompt_token_infos(tok, ids, scored, prompt)
    assert [e.token_id for e in entries] == ids
    assert [e.logprob for e in entries] == [None, *(-1.0 * i for i in range(1, len(ids)))]
    assert entries[0].top == () and entries[1].top == ((entries[1].text, -0.5),)
    offsets = [e.offset for e in entries]
    assert offsets == sorted(offsets) and offsets[:2] == [0, 0]  # BOS has no text
    asm = TextAssembler(tok, (), logprobs=True, offset_base=len(prompt))
    out = ids_of(tok, " world")
    for i in out:
        asm.push(i, -0.1)
    entries += asm.finish()[1]
    logprobs = CompletionFormat("id", 0, "m", logprobs=True)._logprobs(entries)
    assert logprobs is not None
    assert logprobs["tokens"][0] == tok.decode([ids[0]]) and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["top_logprobs"][1] == {entries[1].text: -1.0}
    assert logprobs["text_offset"][len(ids)] == len(prompt)
    whole = prompt + asm.text
    for e in entries[1:]:  # each token's own text is where its offset says
        assert whole[e.offset :].startswith(e.text)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_streamed_text_never_passes_a_stop_string(tok, data):
    words = ["ab", "cd", "ef", "gh", " ", "a", "bc"]
    text = "".join(data.draw(st.lists(st.sampled_from(words), min_size=1, max_size=30)))
    stop = data.draw(st.sampled_from(["cde", "b c", "hab", "zz"]))
    ids = ids_of(tok, text)
    asm = TextAssembler(tok, (stop,), logprobs=False)
    sent = ""
    for i in ids:
        if asm.stopped:
            break
        asm.push(i, None)
        sent += asm.take()[0]
        assert stop not in sent
    final = sent + asm.finish()[0]
    whole = tok.decode(ids, skip_special_tokens=True)
    cut = whole.find(stop)
    assert final == (whole if cut == -1 else whole[:cut])
