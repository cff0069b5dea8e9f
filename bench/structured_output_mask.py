"""Per-step cost of structured output: the token bitmask for a batch, side by side per library.

Each row of a batch follows its own valid JSON document for one schema, token by token, from
its own offset (so rows sit in different grammar states, mid-JSON). One step is what a decode
step adds for the batch:

  fill     the batch's bitmask ([B, ceil(vocab/32)] int32), through the library's batched fill
  accept   every matcher advances by its next token
  apply    the bitmask applied to [B, vocab] float32 logits: the "module" rows run
           engine.structured_output.apply_token_masks (xgrammar's fill + numpy/torch apply),
           beside xgrammar's own CPU apply kernel on the same bitmask

and, once per tokenizer, the cold compile time of the schema (cache off) and of the tokenizer's
own tables. Times are medians over the steps, in milliseconds per step for the whole batch.
llguidance builds its lexer lazily: its compile is small and new states pay on their first
masks instead (the medians leave most of that out); xgrammar precomputes at compile time.

    python bench/structured_output_mask.py                 # tiny (2048) and default (32000) vocab
    python bench/structured_output_mask.py --vocab 2048 32000 128256  # + a Llama-3-sized BPE
    python bench/structured_output_mask.py --batches 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.cpu_info import CpuInfo

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "name": {"type": "string", "maxLength": 40},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "[0-9]{5}"},
            },
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "scores": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["id", "name", "active", "role", "address", "tags", "scores"],
}


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Valid instances of SCHEMA, serialized as json.dumps does (", " and ": ", no newlines)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "serving", "decode", "prefill", "Zürich", "x y"]
    docs = []
    for _ in range(n):
        doc = {
            "id": rng.randrange(1_000_000),
            "name": " ".join(rng.choices(words, k=rng.randint(1, 4)))[:40],
            "active": rng.random() < 0.5,
            "role": rng.choice(["admin", "editor", "viewer"]),
            "address": {"city": rng.choice(words), "zip": f"{rng.randrange(100000):05d}"},
            "tags": rng.choices(words, k=rng.randint(0, 8)),
            "scores": [round(rng.uniform(-100, 100), rng.randint(0, 3)) for _ in range(5)],
        }
        docs.append(json.dumps(doc, ensure_ascii=False))
    return docs


class XgrammarLib:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.tokenizer_s = time.perf_counter() - t0
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: str) -> Any:
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def accept(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))

    def fill(self, ms: list[Any], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, bitmask)

    def accept_batch(self, ms: list[Any], tokens: list[int]) -> None:
        ok = self.batch.batch_accept_token(ms, tokens)
        assert all(ok)


class LlguidanceLib:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.tokenizer_s = time.perf_counter() - t0
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.fill_par = llguidance.torch.fill_next_token_bitmask_par

    def compile(self, schema: str) -> Any:
        # Same output format as xgrammar's any_whitespace=False: json.dumps' separators.
        opts: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=opts)
        # llguidance compiles lazily in the matcher; the first matcher is the compile.
        m = self.llg.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tok, compiled)

    def accept(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token))

    def fill(self, ms: list[Any], bitmask: torch.Tensor) -> None:
        self.fill_par(self.executor, [(m, i) for i, m in enumerate(ms)], bitmask)

    def accept_batch(self, ms: list[Any], tokens: list[int]) -> None:
        for m, t in zip(ms, tokens, strict=True):
            assert m.consume_token(t), m.get_error()


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def run_lib(lib: Any, docs: list[list[int]], batch: int, steps: int, vocab: int) -> dict:
    compiled = lib.compile(json.dumps(SCHEMA))
    # Row i starts `offset` tokens into document i and is advanced there untimed.
    rows = []
    for i in range(batch):
        doc = docs[i % len(docs)]
        offset = (7 * i) % max(1, len(doc) - steps - 1)
        m = lib.matcher(compiled)
        for t in doc[:offset]:
            assert lib.accept(m, t)
        rows.append((m, doc[offset : offset + steps]))
    ms = [m for m, _ in rows]
    bitmask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32)
    fill_s, accept_s = [], []
    for s in range(steps):
        t0 = time.perf_counter()
        lib.fill(ms, bitmask)
        t1 = time.perf_counter()
        lib.accept_batch(ms, [toks[s] for _, toks in rows])
        t2 = time.perf_counter()
        fill_s.append(t1 - t0)
        accept_s.append(t2 - t1)
    return {"fill": median_ms(fill_s), "accept": median_ms(accept_s)}


def run_module(
    tokenizer: Any, docs: list[list[int]], batch: int, steps: int, vocab: int, threads: int
) -> dict:
    """The engine's own path: StructuredOutputCompiler + apply_token_masks on float32 logits."""
    from engine.structured_output import GuidedSpec, StructuredOutputCompiler, apply_token_masks

    compiler = StructuredOutputCompiler(tokenizer, vocab_size=vocab, mask_threads=threads)
    grammar = compiler.compile(GuidedSpec("json_schema", json.dumps(SCHEMA))).result()
    rows = []
    for i in range(batch):
        doc = docs[i % len(docs)]
        offset = (7 * i) % max(1, len(doc) - steps - 1)
        m = grammar.matcher()
        m.replay(doc[:offset])
        rows.append((m, doc[offset : offset + steps]))
    import xgrammar as xgr

    base = torch.randn(batch, vocab)
    matchers = [m for m, _ in rows]
    apply_s, accept_s, kernel_s = [], [], []
    for s in range(steps):
        logits = base.clone()
        t0 = time.perf_counter()
        apply_token_masks(logits, list(range(batch)), matchers)
        t1 = time.perf_counter()
        for m, toks in rows:
            assert m.accept(toks[s])
        t2 = time.perf_counter()
        # The library's CPU kernel on the same bitmask, for comparison.
        bitmask, logits = grammar.workspace.bitmask[:batch], base.clone()
        t3 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab)
        kernel_s.append(time.perf_counter() - t3)
        apply_s.append(t1 - t0)
        accept_s.append(t2 - t1)
    compiler.shutdown()
    return {
        "fill+apply": median_ms(apply_s),
        "accept": median_ms(accept_s),
        "xgr_kernel_apply": median_ms(kernel_s),
    }


def compile_ms(lib: Any, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        lib.compile(json.dumps(SCHEMA))
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def load_tokenizer(vocab: int, cache: Path) -> Any:
    """2048: the tiny test model's tokenizer; 32000: the default model's; other sizes: a
    byte-level BPE of that size trained here (128256 takes about a minute, cached in `cache`)."""
    from transformers import AutoTokenizer

    from modelmaker import PRESETS, ensure_default_model
    from modelmaker.tokenizer import save_tokenizer

    if vocab == PRESETS["small"].vocab_size:
        return AutoTokenizer.from_pretrained(ensure_default_model())
    path = cache / f"tokenizer-{vocab}"
    if not (path / "tokenizer.json").is_file():
        save_tokenizer(vocab, "gpt2", path)
    return AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        default=[2048, 32000],
        help="2048: the tiny test model's tokenizer; 32000: the default model's; "
        "others: a BPE of that size trained here, e.g. 128256 (Llama 3)",
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--steps", type=int, default=40, help="timed steps per batch (default 40)")
    p.add_argument("--threads", type=int, default=1, help="mask-fill threads (default 1)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch's intra-op threads, which the apply uses (default: torch's, "
        f"{torch.get_num_threads()}); 1 is steadier on a loaded machine",
    )
    p.add_argument(
        "--libs",
        nargs="+",
        choices=["xgrammar", "llguidance"],
        default=["xgrammar", "llguidance"],
        help="uninstalled: skipped",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("/tmp/splitserve-bench-tokenizers"),
        help="where trained tokenizers are kept between runs",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.torch_threads)

    classes: dict[str, Any] = {"xgrammar": XgrammarLib, "llguidance": LlguidanceLib}
    cpu = CpuInfo.read().recorded()
    print(f"CPU: {cpu['model_name']} ({os.cpu_count()} cpus; {' '.join(cpu['flags'])})")
    print(
        f"torch {torch.__version__} ({args.torch_threads} threads), {args.threads} mask "
        f"threads, median of {args.steps} steps, load average {os.getloadavg()[0]:.1f}"
    )
    results: list[dict] = []
    for vocab in args.vocab:
        tokenizer = load_tokenizer(vocab, args.cache)
        docs = [tokenizer.encode(d, add_special_tokens=False) for d in make_documents(64)]
        print(f"\nvocab {vocab} (tokenizer {len(tokenizer)}), docs of {len(docs[0])}+ tokens")
        print(f"{'library':<12} {'tok tables':>10} {'compile':>9} {'batch':>5} "
              f"{'fill':>8} {'accept':>8} {'step':>8} {'per row':>8}")  # fmt: skip
        for name in args.libs:
            try:
                lib = classes[name](tokenizer, vocab, args.threads)
            except ImportError:
                print(f"{name:<12} not installed")
                continue
            c_ms = compile_ms(lib)
            for b in args.batches:
                r = run_lib(lib, docs, b, args.steps, vocab)
                step = r["fill"] + r["accept"]
                results.append(
                    {"vocab": vocab, "library": name, "batch": b, "compile_ms": c_ms, **r}
                )
                print(f"{name:<12} {lib.tokenizer_s * 1e3:>8.0f}ms {c_ms:>7.1f}ms {b:>5} "
                      f"{r['fill']:>6.3f}ms {r['accept']:>6.3f}ms {step:>6.3f}ms "
                      f"{step / b * 1e3:>6.1f}us")  # fmt: skip
        for b in args.batches:
            r = run_module(tokenizer, docs, b, args.steps, vocab, args.threads)
            results.append({"vocab": vocab, "library": "module", "batch": b, **r})
            print(f"{'module':<12} {'':>10} {'':>9} {b:>5} {r['fill+apply']:>6.3f}ms "
                  f"{r['accept']:>6.3f}ms   (fill+apply, accept; xgrammar's CPU apply kernel "
                  f"alone: {r['xgr_kernel_apply']:.3f}ms)")  # fmt: skip
    if args.json:
        print(json.dumps({"cpu": cpu, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
