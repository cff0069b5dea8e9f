"""How requests end: stop strings, stop token ids, EOS, max_tokens, abort and interruption."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from engine import LLM, SamplingParams
from tests.engine_checks import assert_engine_clean

VOCAB = 2048
EOS = 2  # modelmaker/special_tokens.py: <unk>, <s>, </s> get Llama's ids 0, 1, 2
PROMPTS = ["The quick brown fox", "Hello, world! Please answer", "def add(a, b):"]


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=8 * 2**20)


def greedy(max_tokens: int = 48, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def pick_stop_string(text: str) -> tuple[str, int]:
    """A substring of 4+ chars from the middle of `text` whose first occurrence is there."""
    mid = len(text) // 2
    for start in [*range(mid, len(text) - 8), *range(mid, 3, -1)]:
        s = text[start : start + 5]
        if "\ufffd" in s or not s.strip():
            continue
        if text.find(s) == start:
            return s, start
    raise AssertionError(f"no usable stop string in {text!r}")


def completing_token(llm: LLM, token_ids: list[int], end: int) -> int:
    """Index of the generated token whose text reaches character `end`."""
    decode = llm.tokenizer.decode
    for k in range(len(token_ids)):
        if len(decode(token_ids[: k + 1], skip_special_tokens=True)) >= end:
            return k
    raise AssertionError("text shorter than expected")


# -- stop strings ------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stop_string_truncates_text_and_stops(llm, prompt):
    base = llm.generate(prompt, greedy(), use_tqdm=False)[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 48
    s, i = pick_stop_string(base.text)
    assert i > 0 and len(s) >= 3 and s not in base.text[: i + len(s) - 1]

    out = llm.generate(prompt, greedy(stop=[s]), use_tqdm=False)[0]
    assert out.text == base.text[:i]
    assert out.finish_reason == "stop"
    assert out.stop_reason == s
    assert len(out.token_ids) < len(base.token_ids)
    # Generation ends on the token that completes the stop string, not later.
    k = completing_token(llm, base.token_ids, i + len(s))
    assert out.token_ids == base.token_ids[: k + 1]
    assert_engine_clean(llm)


def test_no_stop_string_ends_the_output_before_min_tokens(llm):
    """As for EOS, a stop string completed by one of the first min_tokens
    tokens does not end the request (vLLM's rule)."""
    prompt = PROMPTS[0]
    base = llm.generate(prompt, greedy(), use_tqdm=False)[0]
    s, i = pick_stop_string(base.text)
    k = completing_token(llm, base.token_ids, i + len(s))
    out = llm.generate(prompt, greedy(stop=[s], min_tokens=k + 1), use_tqdm=False)[0]
    assert len(out.token_ids) > k + 1  # token k + 1 completed it, within min_tokens
    assert out.text.startswith(base.text[: i + len(s)])


def test_earliest_of_several_stop_strings_wins(llm):
    base = llm.generate(PROMPTS[0], greedy(), use_tqdm=False)[0]
    s, i = pick_stop_string(base.text)
    late = base.text[-4:]
    assert base.text.find(late) > i
    out = llm.generate(PROMPTS[0], greedy(stop=[late, s]), use_tqdm=False)[0]
    assert out.stop_reason == s and out.text == base.text[:i]


def test_stop_string_that_never_occurs_changes_nothing(llm):
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    never = "\u2603 no such text \u2603"
    assert all(never not in o.text for o in outs)
    outs2 = llm.generate(PROMPTS, greedy(stop=[never]), use_tqdm=False)
    for a, b in zip(outs, outs2, strict=True):
        assert b.finish_reason == "length" and b.stop_reason is None
        assert b.token_ids == a.token_ids
        assert b.text == a.text


def test_stop_string_completed_by_the_last_allowed_token_still_stops(llm):
    """A stop string completed by the max_tokens-th token must still count: the text is
    cut before it and the request ends with "stop" (vLLM checks stop strings before
    the length limit)."""
    base = llm.generate(PROMPTS[0], greedy(), use_tqdm=False)[0]
    s, i = pick_stop_string(base.text)
    k = completing_token(llm, base.token_ids, i + len(s))
    out = llm.generate(PROMPTS[0], greedy(max_tokens=k + 1, stop=[s]), use_tqdm=False)[0]
    assert out.token_ids == base.token_ids[: k + 1]
    assert out.text == base.text[:i], "the stop string leaked into the output text"
    assert out.finish_reason == "stop"
    assert out.stop_reason == s


def test_text_with_unused_stop_string_keeps_a_trailing_partial_character(llm):
    """Setting a stop string that never matches must not change the text, even when
    the output ends in a byte token that is not (yet) a whole UTF-8 character."""
    decode = llm.tokenizer.decode
    for prompt in PROMPTS:
        ids = llm.generate(prompt, greedy(), use_tqdm=False)[0].token_ids
        cut = next(
            (
                k
                for k in range(len(ids))
                if decode(ids[: k + 1], skip_special_tokens=True).endswith("\ufffd")
            ),
            None,
        )
        if cut is not None:
            break
    else:
        pytest.fail("no greedy output ends a token on a partial UTF-8 character")
    plain = llm.generate(prompt, greedy(max_tokens=cut + 1), use_tqdm=False)[0]
    with_stop = llm.generate(prompt, greedy(max_tokens=cut + 1, stop=["\u2603"]), use_tqdm=False)[0]
    assert plain.text == decode(plain.token_ids, skip_special_tokens=True)
    assert with_stop.token_ids == plain.token_ids
    assert with_stop.text == plain.text


# -- stop token ids ----------------------------------------------------------------------


def test_stop_token_id_ends_generation_inclusive(llm):
    for prompt in PROMPTS:
        base = llm.generate(prompt, greedy(), use_tqdm=False)[0]
        t = base.token_ids[9]
        if t not in base.token_ids[:9]:
            break
    else:
        pytest.fail("every prompt repeats its 10th token earlier")
    out = llm.generate(prompt, greedy(stop_token_ids=[t, VOCAB - 1]), use_tqdm=False)[0]
    assert out.token_ids == base.token_ids[:10]
    assert out.finish_reason == "stop"
    assert out.stop_reason == t
    # The token is kept in token_ids; the text is its decode.
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert_engine_clean(llm)


# -- EOS ---------------------------------------------------------------------------------


def test_eos_token_stops_unless_ignored(llm):
    """Find a (seeded, so reproducible) sampled continuation that emits </s>, then rerun
    it honouring EOS: it must end at the first </s>, inclusive."""
    assert EOS in llm.engine.eos_token_ids
    rng = random.Random(0)
    # Prompts sprinkled with </s> make the model emit it now and then.
    candidates = [
        [rng.choice([EOS, rng.randrange(4, VOCAB)]) for _ in range(rng.randrange(3, 20))]
        for _ in range(64)
    ]
    found = None
    for start in range(0, len(candidates), 16):
        chunk = candidates[start : start + 16]
        params = [
            SamplingParams(temperature=1.0, seed=start + j, max_tokens=100, ignore_eos=True)
            for j in range(len(chunk))
        ]
        for prompt, p, out in zip(
            chunk, params, llm.generate(chunk, params, use_tqdm=False), strict=True
        ):
            if EOS in out.token_ids[1:]:
                found = prompt, p, out
                break
        if found:
            break
    if found is None:
        pytest.fail("no candidate emitted </s>; test_eos_from_generation_config covers EOS")
    prompt, p, ignored = found
    assert len(ignored.token_ids) == 100 and ignored.finish_reason == "length"
    first = ignored.token_ids.index(EOS)
    honoured = SamplingParams(temperature=1.0, seed=p.seed, max_tokens=100, ignore_eos=False)
    out = llm.generate(prompt, honoured, use_tqdm=False)[0]
    assert out.token_ids == ignored.token_ids[: first + 1]
    assert out.finish_reason == "stop"
    assert out.stop_reason is None  # EOS, not a user stop token
    assert "</s>" not in out.text
    assert_engine_clean(llm)


def test_eos_from_generation_config(tiny_llama, tmp_path, llm):
    """EOS ids come from generation_config.json (a list is allowed) and the tokenizer."""
    base = llm.generate(PROMPTS[0], greedy(), use_tqdm=False)[0].token_ids
    pos = next(i for i in range(5, 48) if base[i] not in base[:i])
    t = base[pos]
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_id"] = [t, EOS]
    (model / "generation_config.json").write_text(json.dumps(gen))

    eng_llm = LLM(str(model), dtype="float32", kv_cache_bytes=2**20)
    assert set(eng_llm.engine.eos_token_ids) == {t, EOS}
    out = eng_llm.generate(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False
    )[0]
    assert out.token_ids == base[: pos + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    ignored = eng_llm.generate(PROMPTS[0], greedy(), use_tqdm=False)[0]
    assert ignored.token_ids == base and ignored.finish_reason == "length"
    assert_engine_clean(eng_llm)


# -- abort -------------------------------------------------------------------------------


def test_abort_running_and_waiting_requests(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=2**20, max_num_seqs=2)
    eng = llm.engine
    rng = random.Random(2)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in (6, 9, 12, 15)]
    params = greedy(max_tokens=12)
    reqs = [eng.make_request(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)]
    for r in reqs:
        eng.add_request(r)
    finished = []
    for _ in range(3):
        finished += eng.step()
    assert not finished
    running = [r.request_id for r in eng.scheduler.running]
    waiting = [r.request_id for r in eng.scheduler.waiting]
    assert running == ["r0", "r1"] and waiting == ["r2", "r3"]
    used_before = eng.block_pool.num_used_blocks

    a_run = eng.abort_request("r1")
    assert a_run is not None
    assert a_run.finish_reason == "abort" and a_run.request_id == "r1"
    assert 1 <= len(a_run.token_ids) < 12
    assert a_run.prompt_token_ids == prompts[1]
    assert eng.block_pool.num_used_blocks < used_before  # its blocks are back at once

    a_wait = eng.abort_request("r3")
    assert a_wait is not None
    assert a_wait.finish_reason == "abort" and a_wait.token_ids == []
    assert a_wait.first_token_time is None and a_wait.ttft is None

    assert eng.abort_request("r1") is None  # already gone
    assert eng.abort_request("no-such-request") is None

    while eng.has_unfinished_requests():
        finished += eng.step()
    assert sorted(o.request_id for o in finished) == ["r0", "r2"]
    for o in finished:
        assert o.finish_reason == "length" and len(o.token_ids) == 12
        alone = llm.generate(prompts[int(o.request_id[1])], params, use_tqdm=False)[0]
        assert o.token_ids == alone.token_ids
    assert_engine_clean(llm)


def test_interrupt_mid_generate_releases_everything(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=2**20, max_num_seqs=3)
    eng = llm.engine
    rng = random.Random(4)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in (5, 30, 8, 17, 3)]
    params = greedy(max_tokens=20, stop=["\u2603"])  # with detokenizer state too
    expected = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    original = eng.step
    calls = 0

    def interrupted_step():
        nonlocal calls
        calls += 1
        out = original()
        if calls == 3:
            assert eng.block_pool.num_used_blocks > 0
            raise KeyboardInterrupt
        return out

    eng.step = interrupted_step  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params, use_tqdm=False)
    assert calls == 3
    assert_engine_clean(llm)
    assert not eng._detok, "detokenizer state leaked for aborted requests"

    # The engine is still usable and gives the same answers.
    eng.step = original  # type: ignore[method-assign]
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    assert_engine_clean(llm)
