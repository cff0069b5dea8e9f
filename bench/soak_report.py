"""The soak's verdict (bench/soak.py): the report of a run, as JSON and as text, and where the
cluster's logs show errors."""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.soak_chaos import ChaosEvent
from bench.soak_config import SoakConfig
from bench.soak_verdicts import KINDS, Outcome, group_reason
from bench.soak_watch import Watch, is_idle
from deploy import loadgen


def build_report(
    config: SoakConfig,
    rate: float,
    measured: float | None,
    load_s: float,
    outcomes: Sequence[Outcome],
    events: Sequence[ChaosEvent],
    watch: Watch,
    end: dict[str, Any],
    router_migrations: dict[str, float],
) -> dict[str, Any]:
    by_kind = {k: [o for o in outcomes if o.kind == k] for k in KINDS}
    done = by_kind["completed"]
    workers = end.get("workers", [])
    leaked = [w for w in workers if w.get("healthy") and not is_idle(w)]
    not_back = [w for w in workers if not w.get("healthy")]
    ok = not (by_kind["lost"] or by_kind["malformed"] or leaked or not_back) and bool(workers)
    kept = (
        "role",
        "address",
        "pid",
        "healthy",
        "kv_blocks_total",
        "kv_blocks_free",
        "awaiting_kv",
        "held",
        "running",
        "waiting",
        "restarts",
        "last_error",
    )
    return {
        "ok": ok,
        "config": {**asdict(config), "log_dir": str(config.log_dir)},
        "rate": rate,
        "rate_measured": measured,
        "load_s": round(load_s, 3),
        "sent": len(outcomes),
        "streamed": sum(o.stream for o in outcomes),
        **{k: len(v) for k, v in by_kind.items()},
        "reasons": {
            k: dict(Counter(group_reason(o.reason) for o in by_kind[k]).most_common())
            for k in ("failed", "lost", "malformed")
        },
        # Every request that must not happen, in full, to find in the logs.
        "lost_requests": [asdict(o) for o in by_kind["lost"]][:100],
        "malformed_requests": [asdict(o) for o in by_kind["malformed"]][:100],
        "requests": [asdict(o) for o in outcomes],
        "migrated_requests": sum(o.migrations > 0 for o in outcomes),
        "migrations": sum(o.migrations for o in outcomes),
        # attempts counts every decode worker tried, migrations included
        "retried_requests": sum(o.attempts > 1 + o.migrations for o in outcomes),
        "router_migrations": {
            k.split("{")[1][:-1]: int(v) for k, v in router_migrations.items() if "{" in k
        },
        "recomputed_after_first_token": watch.counter("splitserve_kv_failures{recomputed}"),
        "kv_failures_failed": watch.counter("splitserve_kv_failures{failed}"),
        "local_prefills": watch.counter("splitserve_decode_local_prefills"),
        "migrations_in": watch.counter("splitserve_decode_migrations_in"),
        "restarts_total": end.get("restarts_total"),
        "chaos": [asdict(e) for e in events],
        "kills": sum(e.done and e.action == "kill" for e in events),
        "freezes": sum(e.done and e.action == "freeze" for e in events),
        "output_tokens": sum(o.completion_tokens or 0 for o in done),
        "completed_per_s": len(done) / load_s if load_s > 0 else 0.0,
        "ttft_s": loadgen.latency_stats([o.ttft_s for o in done if o.ttft_s is not None]),
        "e2e_s": loadgen.latency_stats([o.e2e_s for o in done if o.e2e_s is not None]),
        "end_workers": [{k: w.get(k) for k in kept} for w in workers],
        "leaked": [w["address"] for w in leaked],
        "not_back": [w["address"] for w in not_back],
    }


def format_report(r: dict[str, Any]) -> str:
    def ms(st: dict[str, float | None], key: str) -> str:
        v = st[key]
        return f"{v * 1e3:.0f} ms" if v is not None else "-"

    rate = f"{r['rate']:.2f} req/s" + (" (measured)" if r["rate_measured"] else "")
    lines = [
        f"---- soak: {r['load_s']:.0f} s at {rate}, seed {r['config']['seed']} " + "-" * 20,
        f"sent                {r['sent']}  ({r['streamed']} streamed)",
        f"completed in full   {r['completed']}  ({r['completed_per_s']:.2f} req/s, "
        f"{r['output_tokens']} tokens)",
        f"failed (clear)      {r['failed']}",
        f"lost                {r['lost']}",
        f"malformed           {r['malformed']}",
        f"migrated            {r['migrated_requests']} requests ({r['migrations']} moves); "
        f"router: {r['router_migrations'] or '{}'}",
        f"retried before 1st  {r['retried_requests']}",
        f"recomputed          {r['recomputed_after_first_token']} after the first token; "
        f"{r['local_prefills']} prompts prefilled on a decode worker; "
        f"{r['migrations_in']} migrations taken in",
        f"chaos               {r['kills']} kills, {r['freezes']} freezes "
        f"({len(r['chaos'])} attempted)",
        f"worker restarts     {r['restarts_total']}",
        f"TTFT  p50 {ms(r['ttft_s'], 'p50'):>9}   p99 {ms(r['ttft_s'], 'p99'):>9}",
        f"E2E   p50 {ms(r['e2e_s'], 'p50'):>9}   p99 {ms(r['e2e_s'], 'p99'):>9}",
    ]
    for kind in ("failed", "lost", "malformed"):
        for reason, n in r["reasons"][kind].items():
            lines.append(f"  {kind:<9} x{n:<5} {reason}")
    lines.append(
        f"{'worker':<26}{'blocks free':>14}{'awaiting':>9}{'held':>6}"
        f"{'running':>8}{'waiting':>8}{'restarts':>9}"
    )
    for w in r["end_workers"]:
        name = f"{w['role']} {w['address']}" + ("" if w["healthy"] else " DOWN")
        free = f"{w['kv_blocks_free']}/{w['kv_blocks_total']}"
        lines.append(
            f"{name:<26}{free:>14}{w['awaiting_kv']!s:>9}{w['held']!s:>6}"
            f"{w['running']!s:>8}{w['waiting']!s:>8}{w.get('restarts')!s:>9}"
        )
    for e in r["chaos"]:
        what = f"{e['action']} {e['role']} {e['address']} pid {e['pid']}"
        extra = f" for {e['freeze_s']:.1f} s" if e["freeze_s"] else ""
        lines.append(
            f"  chaos at {e['at_s']:6.1f} s ({e['wall']}): {what}{extra}"
            + ("" if e["done"] else f" NOT DONE: {e['note']}")
        )
    problems = [
        f"{r['lost']} lost" if r["lost"] else "",
        f"{r['malformed']} malformed" if r["malformed"] else "",
        f"leaked on {r['leaked']}" if r["leaked"] else "",
        f"not back: {r['not_back']}" if r["not_back"] else "",
    ]
    found = "; ".join(p for p in problems if p) or "no worker answered /cluster"
    verdict = "OK: nothing lost, nothing leaked" if r["ok"] else f"FAILED: {found}"
    for error, n in list(r.get("worker_log_errors", {}).items())[:8]:
        lines.append(f"  worker log ERROR x{n:<4} {error[:110]}")
    if "logs" in r:
        lines.append(f"logs: {r['logs']['serve']}; workers: {' '.join(r['logs']['workers'])}")
    lines.append(verdict)
    return "\n".join(lines)


def worker_logs(serve_log: Path) -> list[str]:
    """The worker log files the launcher named in its own log."""
    try:
        text = serve_log.read_text(errors="replace")
    except OSError:
        return []
    return sorted(set(re.findall(r", log (\S+\.log)", text)))


def log_errors(paths: Sequence[str]) -> dict[str, int]:
    """ERROR lines in the workers' logs, grouped: not a verdict (a killed
    peer is logged as one), but where to look first."""
    found: Counter[str] = Counter()
    for path in paths:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text(errors="replace").splitlines():
                m = re.match(r"\d\d:\d\d:\d\d ERROR (\w+)\[\d+\]: (.*)", line)
                if m:
                    found[f"{m[1]}: {group_reason(m[2])}"] += 1
    return dict(found.most_common())
