"""bench/structured_output.py end to end on the tiny test model: both arms at two batch
sizes, two interleaved rounds; every schema output is a valid document, the grammar's time
is measured, and the engine's functions are left as they were."""

from __future__ import annotations

import json

import torch

from bench import structured_output as bench
from engine import structured_output as so
from engine.dtype_choice import choose_dtype


def test_bench_runs_both_arms_and_every_schema_output_validates(tiny_llama, tmp_path):
    apply_masks, accept = so.apply_token_masks, so.GrammarMatcher.accept
    out = tmp_path / "so.json"
    threads = torch.get_num_threads()
    # One torch thread: steady on a shared machine (two can wait on each other's core).
    argv = ["--model", str(tiny_llama), "--batches", "2", "--rounds", "2", "--threads", "1"]
    assert bench.main([*argv, "--max-tokens", "160", "--json", str(out)]) == 0
    # The bench's timing wrappers are gone, and the thread count is restored.
    assert so.apply_token_masks is apply_masks and so.GrammarMatcher.accept is accept
    assert torch.get_num_threads() == threads

    result = json.loads(out.read_text())
    # The dtype `auto` picks on this CPU (bfloat16 only with bfloat16 instructions).
    auto = choose_dtype("auto", torch.device("cpu"), None).name
    assert result["cpu"]["model_name"] and result["dtype"] == auto
    assert [b["batch"] for b in result["batches"]] == [2]
    assert result["invalid"] == 0
    for b in result["batches"]:
        assert b["requests"] == 4 and b["invalid"] == 0, b["invalid_examples"]
        plain, schema = b["plain"], b["schema"]
        assert len(plain["rounds"]) == len(schema["rounds"]) == 2
        assert plain["output_tok_s"] > 0 and schema["output_tok_s"] > 0
        assert plain["output_tok_per_cpu_s"] > 0 and schema["output_tok_per_cpu_s"] > 0
        assert plain["mean_output_tokens"] == 160  # ignore_eos: exactly max_tokens
        # The grammar ended every schema output (finish "stop", counted valid) before max_tokens.
        assert 0 < schema["max_output_tokens"] < 160
        assert all(r["invalid"] == 0 for r in schema["rounds"])
        # The masks were timed in the schema arm only.
        assert schema["mask_ms"] > 0 and schema["accept_ms"] > 0 and plain["mask_ms"] == 0
        assert schema["mask_rows_per_call"] <= b["batch"]
        assert 0 < schema["grammar_share"] < 1
        assert b["ratios"]["output_tok_s"] > 0 and b["ratios"]["step_ms"] > 0
    rows = result["table"].splitlines()
    assert len(rows) == 3 and rows[2].startswith("| 2 | 4 |") and rows[2].endswith("| 0/8 |")


def test_invalid_outputs_names_each_failure():
    class Out:
        def __init__(self, text: str, finish: str = "stop") -> None:
            self.text, self.finish_reason, self.token_ids = text, finish, [0] * 3

    doc = {
        "status": "ok",
        "healthy": True,
        "replicas": 3,
        "priority": 0,
        "owner": {"team": "ml", "oncall": False},
        "zones": ["eu"],
        "summary": "fine",
    }
    outs = [
        Out(json.dumps(doc)),
        Out(json.dumps({**doc, "replicas": 65})),  # above the maximum
        Out('{"status": "ok"'),  # not JSON
        Out('{"status": "ok", "hea', "length"),  # cut short
    ]
    bad = bench.invalid_outputs(outs, bench.SCHEMA)
    assert len(bad) == 3
    assert bad[0].startswith("ValidationError") and bad[1].startswith("JSONDecodeError")
    assert bad[2].startswith("finish 'length'")
