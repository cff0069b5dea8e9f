"""The C kernels (engine/cpu_kernels.py) against PyTorch: the paged decode
kernel against engine/attention.py on random caches, and the row argmax.

Every case builds its block tables from a shuffled pool, pads them with extra entries,
and poisons (NaN) everything the kernel must not read: the padding blocks, the slots
past each context in its last block and, with a sliding window, the positions that fell
out of it. The reference runs on a clean copy of the same cache.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from engine import cpu_kernels
from engine.attention import paged_decode_attention

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason="no C compiler: the CPU kernels cannot be built (the engine uses torch)",
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_case(
    seed: int,
    lens: list[int],
    *,
    heads: int,
    kv_heads: int,
    dim: int,
    block_size: int,
    dtype: torch.dtype,
    window: int | None = None,
    pad_blocks: int = 2,
    q_scale: float = 1.0,
):
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    need = [-(-n // block_size) for n in lens]
    num_poison = 3
    num_blocks = sum(need) + num_poison
    perm = torch.randperm(num_blocks, generator=g).tolist()
    poison_ids, pool = perm[:num_poison], perm[num_poison:]
    width = max(need) + pad_blocks
    tables = torch.empty(b, width, dtype=torch.int64)
    it = iter(pool)
    for i, n in enumerate(need):
        row = [next(it) for _ in range(n)]
        pad = [poison_ids[j % num_poison] for j in range(width - n)]
        tables[i] = torch.tensor(row + pad)

    shape = (num_blocks, block_size, kv_heads, dim)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    q = (torch.randn(b, heads, dim, generator=g) * q_scale).to(dtype)
    k_bad, v_bad = k.clone(), v.clone()
    nan = float("nan")
    for pid in poison_ids:
        k_bad[pid] = nan
        v_bad[pid] = nan
    for i, n in enumerate(lens):
        first = max(0, n - window) if window is not None else 0
        for p in itertools.chain(range(first), range(n, need[i] * block_size)):
            blk, off = tables[i, p // block_size], p % block_size
            k_bad[blk, off] = nan
            v_bad[blk, off] = nan
    ctx = torch.tensor(lens, dtype=torch.int64)
    return q, (k, v), (k_bad, v_bad), tables, ctx


def check(lens, *, seed=0, dtype=torch.float32, window=None, atol=None, **kw):
    q, (k, v), (k_bad, v_bad), tables, ctx = make_case(seed, lens, dtype=dtype, window=window, **kw)
    scale = q.shape[-1] ** -0.5
    got = cpu_kernels.paged_decode_attention_cpu(q, k_bad, v_bad, tables, ctx, scale, window)
    assert got.shape == q.shape and got.dtype == dtype
    assert torch.isfinite(got).all(), "the kernel read a slot it must not"
    # Reference in float32 on the same (rounded) inputs, and the torch path in `dtype`.
    ref = paged_decode_attention(q.float(), k.float(), v.float(), tables, ctx, scale, window)
    atol = TOL[dtype] if atol is None else atol
    torch.testing.assert_close(got.float(), ref, atol=atol, rtol=0)
    if dtype != torch.float32:
        same = paged_decode_attention(q, k, v, tables, ctx, scale, window)
        torch.testing.assert_close(got.float(), same.float(), atol=atol, rtol=0)


RAGGED = [1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 50, 64, 65]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim", [64, 128, 32], ids=["d64", "d128", "d32_generic"])
@pytest.mark.parametrize("group", [1, 2, 4], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("block_size", [8, 16], ids=["bs8", "bs16"])
def test_matches_torch(dtype, dim, group, block_size):
    kv_heads = 2
    check(
        RAGGED,
        seed=dim + group + block_size,
        dtype=dtype,
        heads=kv_heads * group,
        kv_heads=kv_heads,
        dim=dim,
        block_size=block_size,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [1, 5, 16, 24, 100])
def test_sliding_window(dtype, window):
    check(
        RAGGED, seed=window, dtype=dtype, window=window, heads=4, kv_heads=2, dim=64, block_size=8
    )


def test_single_sequence_of_one_token():
    # Attention over one position returns that position's V, whatever the query.
    q, (k, v), _, tables, ctx = make_case(
        1, [1], heads=4, kv_heads=1, dim=128, block_size=16, dtype=torch.float32, pad_blocks=0
    )
    got = cpu_kernels.paged_decode_attention_cpu(q, k, v, tables, ctx, 0.125)
    want = v[tables[0, 0], 0, 0].expand(4, 128)
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lens", [[1], [40], [70]], ids=["ctx1", "ctx40", "ctx70"])
def test_batch_of_one(lens):
    check(lens, seed=3, heads=8, kv_heads=2, dim=64, block_size=16)


@pytest.mark.parametrize("threads", [None, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_odd_batch_split_across_threads(threads, dtype):
    """37 sequences split into uneven slices, one per thread, each with its own scratch."""
    lens = [1 + (i * 23) % 97 for i in range(37)]
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        check(lens, seed=37, dtype=dtype, heads=8, kv_heads=2, dim=64, block_size=16)
        # Then a larger context right after: scratch buffers must grow, not overflow.
        check([300, *lens[:8]], seed=38, dtype=dtype, heads=8, kv_heads=2, dim=64, block_size=16)
    finally:
        torch.set_num_threads(before)


def test_large_scores_are_stable():
    """Scores past exp's float32 range (~88): the softmax must subtract the maximum. An
    exponent of ~100 carries ~1e-5 rounding, hence the looser tolerance."""
    check(RAGGED, seed=5, heads=4, kv_heads=2, dim=64, block_size=16, q_scale=40.0, atol=1e-4)


def test_padding_tables_of_any_width():
    for pad in (0, 1, 7):
        check([3, 17, 33], seed=pad, heads=4, kv_heads=4, dim=32, block_size=8, pad_blocks=pad)


def test_rejects_unsupported_dtype():
    q, (k, v), _, tables, ctx = make_case(
        0, [5], heads=2, kv_heads=2, dim=32, block_size=8, dtype=torch.float16
    )
    with pytest.raises(TypeError):
        cpu_kernels.paged_decode_attention_cpu(q, k, v, tables, ctx, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_argmax_rows_matches_torch(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 32000, generator=g).to(dtype)
    assert torch.equal(cpu_kernels.argmax_rows(x), x.float().argmax(dim=-1))


def test_argmax_rows_ties_go_to_the_first_index():
    x = torch.zeros(3, 100, dtype=torch.bfloat16)
    x[1, 40] = x[1, 70] = 2.0
    x[2] = -1.0
    assert cpu_kernels.argmax_rows(x).tolist() == [0, 40, 0] == x.argmax(dim=-1).tolist()


def test_argmax_rows_falls_back_for_other_layouts():
    x = torch.randn(8, 50)
    assert torch.equal(cpu_kernels.argmax_rows(x.t()), x.t().argmax(dim=-1))  # not contiguous
    h = x.half()
    assert torch.equal(cpu_kernels.argmax_rows(h), h.argmax(dim=-1))  # float16
