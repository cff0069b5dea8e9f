"""End to end over real processes on 127.0.0.1: `splitserve serve` (router +
1 prefill + 1 decode worker, and a colocated cluster; tests/e2e/conftest.py),
driven by the `openai` client. Output must equal the offline engine's token
for token."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest

from engine import SamplingParams
from tests.cluster import ServeCluster, assert_all_blocks_free, role_metric
from tests.e2e.api import client, model_name

PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over",
    "In a hole in the ground there lived",
    "a b c d e f g",
    "It was the best of times, it was the worst of times, it was the age of wisdom",
    "Hello",
]
MAX_TOKENS = [12, 40, 7, 25, 33, 18]


def complete(cluster: ServeCluster, prompt: str, max_tokens: int, **kw) -> tuple[str, list, str]:
    """(text, token logprobs, finish_reason) of a non-streaming completion."""
    r = client(cluster).completions.create(
        model=model_name(cluster),
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=kw.pop("temperature", 0),
        logprobs=0,
        extra_body={"ignore_eos": True},
        **kw,
    )
    c = r.choices[0]
    assert r.usage.completion_tokens == max_tokens
    return c.text, c.logprobs.token_logprobs, c.finish_reason


def test_greedy_output_equals_offline_and_colocated(disagg, colocated, offline):
    expected = offline.generate(
        PROMPTS,
        [
            SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=0)
            for m in MAX_TOKENS
        ],
        use_tqdm=False,
    )
    for prompt, m, exp in zip(PROMPTS, MAX_TOKENS, expected, strict=True):
        for cluster in (disagg, colocated):
            text, logprobs, finish = complete(cluster, prompt, m)
            assert text == exp.text, (cluster.url, prompt)
            assert finish == "length"
            # Same tokens, scored the same: the logprobs match too.
            assert logprobs == pytest.approx(exp.logprobs, abs=1e-3)
    assert_all_blocks_free(disagg.wait_idle())


def test_seeded_sampling_is_the_same_disaggregated_and_colocated(disagg, colocated):
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)
    a = complete(disagg, PROMPTS[1], 30, **kw)[0]
    b = complete(colocated, PROMPTS[1], 30, **kw)[0]
    assert a == b
    assert complete(disagg, PROMPTS[1], 30, temperature=0.9, top_p=0.95, seed=99)[0] != a


def test_streaming_equals_non_streaming_with_usage(disagg):
    text, _, _ = complete(disagg, PROMPTS[4], 33)
    stream = client(disagg).completions.create(
        model=model_name(disagg),
        prompt=PROMPTS[4],
        max_tokens=33,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(pieces) == text
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 33


def test_stream_interval_sends_several_tokens_per_event(colocated):
    """--stream-interval 3: the first token alone, then at least 3 per
    message, so 30 tokens arrive in at most 1 + ceil(29 / 3) = 11 events
    (one a token, ~30, without it; the worker also merges tokens that piled
    up, which only lowers the count)."""
    stream = client(colocated).completions.create(
        model=model_name(colocated),
        prompt=PROMPTS[4],
        max_tokens=30,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    events = sum(1 for chunk in stream for c in chunk.choices if c.text)
    assert 1 <= events <= 11


def test_raw_sse_ends_with_done(disagg):
    body = {"model": model_name(disagg), "prompt": "Hello", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{disagg.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert any(e.get("usage") for e in events)


def test_chat_completions_stream_and_not(disagg, colocated, offline, tiny_llama):
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    ids = offline.engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    exp = offline.generate(
        [ids], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )[0]
    for cluster in (disagg, colocated):
        cl = client(cluster)
        kw = dict(
            model=model_name(cluster),
            messages=messages,
            max_tokens=20,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        r = cl.chat.completions.create(**kw)
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == exp.text
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 20
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in cl.chat.completions.create(stream=True, **kw)
            if c.choices
        )
        assert streamed == exp.text


def test_stop_string_cuts_the_text(disagg, offline):
    full = offline.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )[0].text
    stop = full[10:13]
    assert stop.strip(), "pick a stop string with some text in it"
    r = client(disagg).completions.create(
        model=model_name(disagg), prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client(disagg).completions.create(
            model=model_name(disagg),
            prompt=PROMPTS[0],
            max_tokens=40,
            temperature=0,
            stop=[stop],
            stream=True,
        )
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_64_concurrent_streams_then_every_block_is_free(disagg, offline):
    rng = random.Random(7)
    jobs = [(rng.choice(PROMPTS), rng.choice([1, 5, 16, 40, 90])) for _ in range(64)]
    expected = {
        (p, m): o.text
        for (p, m), o in zip(
            jobs,
            offline.generate(
                [p for p, _ in jobs],
                [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in jobs],
                use_tqdm=False,
            ),
            strict=True,
        )
    }
    aclient = openai.AsyncOpenAI(base_url=f"{disagg.url}/v1", api_key="unused", max_retries=0)
    name = model_name(disagg)

    async def one(prompt: str, max_tokens: int) -> tuple[str, str | None, int]:
        stream = await aclient.completions.create(
            model=name,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text, finish, tokens = [], None, 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for c in chunk.choices:
                text.append(c.text)
                finish = c.finish_reason or finish
        return "".join(text), finish, tokens

    async def run_all():
        return await asyncio.gather(*(one(p, m) for p, m in jobs))

    results = asyncio.run(run_all())
    for (p, m), (text, finish, tokens) in zip(jobs, results, strict=True):
        assert finish == "length" and tokens == m
        assert text == expected[(p, m)]
    assert_all_blocks_free(disagg.wait_idle())
    decode = disagg.workers("decode")[0]
    assert decode["mean_batch_size"] > 1  # the streams were batched together


def test_client_disconnect_frees_blocks_on_both_workers(disagg):
    before = role_metric(disagg, "decode", "splitserve_generation_tokens_total")
    body = {
        "model": model_name(disagg),
        "prompt": PROMPTS[2],
        "max_tokens": 900,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{disagg.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                events += 1
            if events >= 3:
                break  # hang up mid-stream
    assert_all_blocks_free(disagg.wait_idle(timeout=10))
    # The request was aborted, not run to its 900 tokens.
    generated = role_metric(disagg, "decode", "splitserve_generation_tokens_total") - before
    assert 3 <= generated < 900


def test_every_process_exports_its_metrics(disagg):
    complete(disagg, "Hello", 4)
    router = httpx.get(f"{disagg.url}/metrics", timeout=5)
    assert router.status_code == 200 and "splitserve_router_ttft_seconds" in router.text
    assert httpx.get(f"{disagg.url}/metrics/", timeout=5).status_code == 200
    assert role_metric(disagg, "prefill", "splitserve_prefill_compute_seconds_count") >= 1
    assert role_metric(disagg, "prefill", "splitserve_kv_transfer_bytes_total") > 0
    assert role_metric(disagg, "decode", "splitserve_kv_transfer_bytes_total") > 0
    assert role_metric(disagg, "decode", "splitserve_decode_tpot_seconds_count") >= 1
    assert role_metric(disagg, "decode", "splitserve_kv_cache_usage_ratio") == 0.0


def _post(cluster: ServeCluster, path: str, content: bytes, **headers) -> httpx.Response:
    headers.setdefault("content-type", "application/json")
    return httpx.post(f"{cluster.url}{path}", content=content, headers=headers, timeout=30)


def test_bad_requests_get_4xx_json_errors_and_the_server_stays_healthy(disagg):
    name = model_name(disagg)

    def body(**kw) -> bytes:
        return json.dumps({"model": name, "prompt": "Hello", "max_tokens": 5, **kw}).encode()

    cases = {
        "malformed json": b'{"model": ',
        "not an object": b"[1, 2]",
        "non-utf8": b'{"model": "\xff\xfe", "prompt": "\xc3\x28"}',
        "max_tokens a string": body(max_tokens="ten"),
        "temperature a string": body(temperature="hot"),
        "prompt a number": body(prompt=5),
        "negative max_tokens": body(max_tokens=-3),
        "zero max_tokens": body(max_tokens=0),
        "huge max_tokens": body(max_tokens=10**9),
        "over-long prompt": body(prompt="word " * 5000),
        "unknown model": body(model="gpt-17"),
        "n=17": body(n=17),
        "empty prompt": body(prompt=""),
        "bad token id": body(prompt=[1, 2, 10**7]),
        "negative temperature": body(temperature=-1),
        "10 MB body": body(prompt="x" * (10 << 20)),
    }
    for case, content in cases.items():
        r = _post(disagg, "/v1/completions", content)
        assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:200])
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], case
        assert "type" in err, case
    r = _post(disagg, "/v1/chat/completions", json.dumps({"model": name}).encode())
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert httpx.get(f"{disagg.url}/health", timeout=5).status_code == 200
    assert complete(disagg, "Hello", 3)[2] == "length"
    assert_all_blocks_free(disagg.wait_idle())


def test_cluster_endpoint_shape(disagg):
    workers = disagg.cluster()["workers"]
    assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
    for w in workers:
        for key in ("address", "pid", "healthy", "kv_blocks_total", "kv_blocks_free"):
            assert key in w
        assert w["healthy"] is True and w["pid"] in disagg.worker_pids
        assert w["kv_blocks_total"] > 0
        # WORKER_ARGS ask for float32: an explicit dtype wins over `auto`.
        assert (w["dtype"], w["dtype_reason"]) == ("float32", "requested")


def test_a_repeated_prompt_reuses_its_cached_prefix_and_says_so(disagg, colocated, offline):
    """The second time a long prompt arrives, the worker that prefills it
    finds its full blocks in the prefix cache: usage reports them as cached
    tokens (OpenAI's prompt_tokens_details), the worker's metrics count the
    hit, and the output is the same as computed from scratch. On 1P+1D the
    decode worker holds the prefix too (it received it the first time): only
    the blocks it lacks are transferred the second time."""
    prompt = " ".join(["the cat sat on the mat and then it ran away"] * 8)
    (exp,) = offline.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False
    )
    for cluster, role in ((disagg, "prefill"), (colocated, "colocated")):
        hits_before = role_metric(cluster, role, "splitserve_prefix_cache_hits_total")
        usages, timings = [], []
        for _ in range(2):
            r = client(cluster).completions.create(
                model=model_name(cluster),
                prompt=prompt,
                max_tokens=10,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert r.choices[0].text == exp.text
            usages.append(r.usage)
            timings.append(r.model_extra["splitserve_timings"])
        first, second = usages
        assert first.prompt_tokens == second.prompt_tokens > 32
        assert first.prompt_tokens_details.cached_tokens == 0
        cached = second.prompt_tokens_details.cached_tokens
        assert 16 <= cached < second.prompt_tokens and cached % 16 == 0
        hits = role_metric(cluster, role, "splitserve_prefix_cache_hits_total") - hits_before
        assert hits == cached
        if cluster is disagg:
            assert timings[0]["decode_cached_tokens"] == 0
            assert timings[1]["decode_cached_tokens"] == cached
            assert 0 < timings[1]["kv_transfer_bytes"] < timings[0]["kv_transfer_bytes"]
        else:
            assert timings[1]["kv_transfer_bytes"] == timings[1]["decode_cached_tokens"] == 0
