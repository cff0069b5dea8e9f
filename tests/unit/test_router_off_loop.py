"""Large bodies are parsed and tokenized off the router's event loop, over
real HTTP (tests/router_app.py): the router keeps answering meanwhile, and
the result is the same as inline."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from router import RouterConfig, build_app
from tests.router_app import CHAT, NOBODY, C, ServedApp, assert_error, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory)


def test_tokenizing_a_large_body_leaves_the_loop_free(model_dir):
    """While a large prompt is being tokenized, the router keeps answering:
    the tokenizer is held inside encode until another request has been
    answered (were it on the event loop, nothing else could be)."""
    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,)))
    tok = app.state.served.tokenizer
    inside, release = threading.Event(), threading.Event()
    real_encode = tok.encode

    def held_encode(text: str, *args: Any, **kwargs: Any) -> Any:
        if len(text) > 100_000:
            inside.set()
            release.wait(60)
        return real_encode(text, *args, **kwargs)

    tok.encode = held_encode
    served = ServedApp(app)
    try:
        result: dict[str, Any] = {}

        def big() -> None:
            body = {"prompt": "hello " * 30_000, "max_tokens": 1}  # 180 KB
            result["r"] = httpx.post(served.url + C, json=body, timeout=120)

        t = threading.Thread(target=big)
        t.start()
        assert inside.wait(60)
        r = httpx.get(served.url + "/v1/models", timeout=60)
        answered_while_held = not release.is_set()
        release.set()
        t.join(120)
        assert r.status_code == 200 and answered_while_held
        # The large prompt itself was tokenized in full and judged on it.
        assert_error(result["r"], 400, "prompt")
        assert "context length" in result["r"].json()["error"]["message"]
    finally:
        release.set()
        served.stop()


def test_results_are_the_same_on_and_off_the_loop(model_dir):
    """A prompt tokenized off the loop (large body) is tokenized as it is
    inline (small body): the 400 for a too-long prompt counts its tokens,
    and the count is the tokenizer's own."""
    from transformers import AutoTokenizer

    from router.preprocess import OFF_LOOP_BYTES

    tok = AutoTokenizer.from_pretrained(model_dir)
    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,)))
    served = ServedApp(app)
    try:
        for words in (1000, 30_000):  # a body under OFF_LOOP_BYTES, and one far over it
            text = "hello wörld " * words
            assert (len(text.encode()) < OFF_LOOP_BYTES) == (words == 1000)
            n = len(tok.encode(text))
            assert n >= 1024  # over the context: the answer states the count
            r = httpx.post(served.url + C, json={"prompt": text}, timeout=120)
            assert f"prompt has {n} tokens" in r.json()["error"]["message"]
            chat = [{"role": "user", "content": text}]
            out: Any = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            r = httpx.post(served.url + CHAT, json={"messages": chat}, timeout=120)
            assert f"prompt has {len(ids)} tokens" in r.json()["error"]["message"]
    finally:
        served.stop()


def test_preparation_runs_in_a_thread_only_for_large_bodies(model_dir):
    from router.preprocess import OFF_LOOP_BYTES

    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,)))
    tok = app.state.served.tokenizer
    threads: list[str] = []
    real_encode = tok.encode

    def spy(text: str, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_encode(text, *args, **kwargs)

    tok.encode = spy
    served = ServedApp(app)
    try:
        httpx.post(served.url + C, json={"prompt": "hi"}, timeout=30)
        httpx.post(served.url + C, json={"prompt": "a " * OFF_LOOP_BYTES}, timeout=60)
    finally:
        served.stop()
    assert len(threads) == 2
    assert threads[0] == served.thread.name  # small: inline, on the loop's thread
    assert threads[1] != served.thread.name  # large: in the preparation thread
