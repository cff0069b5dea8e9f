"""The side-by-side experiment's arithmetic (bench/disagg_vs_colocated.py):
which requests are good at an SLO scale, and the highest rate sustained with
90% of them good. The figures the README quotes rest on it; the clusters it
drives are the same `splitserve serve` the e2e tests start."""

from __future__ import annotations

import pytest

from bench.disagg_vs_colocated import analyze, is_good, max_sustained_rate, pack, unpack


def _rec(tpot: float | None, ttft: float = 0.1, ok: bool = True) -> dict[str, object]:
    return {"ok": ok, "ttft": ttft, "tpot": tpot, "max_itl": tpot, "output_tokens": 10}


def test_a_request_is_good_within_every_limit():
    assert is_good(_rec(0.02), tpot_limit=0.04, ttft_limit=None)
    assert not is_good(_rec(0.05), tpot_limit=0.04, ttft_limit=None)
    assert not is_good(_rec(0.02, ttft=2.0), tpot_limit=0.04, ttft_limit=1.0)
    assert not is_good(_rec(0.02, ok=False), tpot_limit=0.04, ttft_limit=None)
    assert is_good(_rec(None), tpot_limit=0.04, ttft_limit=None)  # one token: no TPOT
    # The longest gap between tokens, when it is limited too.
    stalled = {**_rec(0.02), "max_itl": 0.7}
    assert is_good(stalled, tpot_limit=0.04) and not is_good(stalled, 0.04, gap_limit=0.25)


def test_sustained_rate_interpolates_to_the_90_percent_crossing():
    assert max_sustained_rate([(2, 1.0), (4, 0.95), (6, 0.85)]) == pytest.approx(5.0)
    assert max_sustained_rate([(2, 1.0), (4, 1.0)]) == 4  # never crossed: the highest swept
    assert max_sustained_rate([(2, 0.5), (4, 0.4)]) == 0.0
    # A later recovery does not count: the first crossing bounds it.
    assert max_sustained_rate([(2, 1.0), (4, 0.8), (6, 0.95)]) == pytest.approx(2.0 + 2 * 0.5)


def test_analysis_per_slo_scale_and_the_ratio():
    base = 0.02  # unloaded TPOT; at 2x the limit is 40 ms
    fast = [_rec(0.03)] * 10
    slow = [_rec(0.03)] * 5 + [_rec(0.05)] * 5  # half good at 2x, all good at 3x
    results = {
        "unloaded_tpot_s": base,
        "slo_scales": [2.0, 3.0],
        "configs": {
            "colocated": {
                "runs": [
                    {"request_rate": 2, "requests": fast},
                    {"request_rate": 4, "requests": slow},
                ]
            },
            "disagg": {
                "runs": [
                    {"request_rate": 2, "requests": fast},
                    {"request_rate": 4, "requests": fast},
                ]
            },
        },
    }
    a = analyze(results)
    col = a["per_config"]["colocated"]
    assert col["2.0"]["attainment"] == [(2, 1.0), (4, 0.5)]
    assert col["2.0"]["max_rate_90"] == pytest.approx(2 + 2 * 0.1 / 0.5)
    assert col["3.0"]["max_rate_90"] == 4
    assert a["disagg_over_colocated"]["2.0"] == pytest.approx(4 / 2.4)
    assert a["disagg_over_colocated"]["3.0"] == pytest.approx(1.0)


def test_results_json_rows_round_trip():
    results = {
        "configs": {"disagg": {"name": "1P+1D", "runs": [{"request_rate": 2, "requests": [
            {"prompt_tokens": 5, "output_tokens": 3, "ok": True, "ttft": 0.1, "tpot": 0.02,
             "max_itl": 0.03},
            {"prompt_tokens": 7, "output_tokens": 0, "ok": False, "ttft": None, "tpot": None,
             "max_itl": None},
        ]}]}},
    }  # fmt: skip
    packed = pack(results)
    assert packed["configs"]["disagg"]["runs"][0]["requests"][1] == [7, 0, False, None, None, None]
    assert unpack(packed) == results
