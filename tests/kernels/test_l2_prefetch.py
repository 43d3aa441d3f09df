"""``mobiquant.kernels.l2_prefetch``: the requests cover every byte of the buffers and never pass their end.

The requests themselves are hints a GPU serves (nothing to observe but time: ``benchmarks/decode_bench.py
--sites-prefetch``); here Triton's interpreter runs the kernel's address arithmetic and records each request's offset.
"""

from __future__ import annotations

import pytest
import torch

from mobiquant.kernels import l2_prefetch as l2


def covered(offs: torch.Tensor, chunk: int, nbytes: int) -> torch.Tensor:
    """Which bytes of ``[0, nbytes)`` the requests at ``offs`` (each ``chunk`` bytes) ask for."""
    hit = torch.zeros(nbytes, dtype=torch.bool)
    for o in offs.tolist():
        hit[o : o + chunk] = True
    return hit


@pytest.mark.parametrize("mode", ["line", "bulk"])
def test_requests_cover_both_buffers(mode):
    chunk = l2.CHUNK[mode]
    a = torch.zeros(3, 70_001, dtype=torch.int32)  # 840 012 bytes: not a whole number of chunks
    b = torch.zeros(9_000, dtype=torch.int16)  # 18 000 bytes
    rec = l2.prefetch_l2(a, b, mode=mode, record=True)
    na, nb = a.numel() * 4, b.numel() * 2
    a_last, a_progs = l2._plan(a, chunk)
    offs_a, offs_b = rec[: a_progs * l2.BLOCK], rec[a_progs * l2.BLOCK :]
    for offs, n in ((offs_a, na), (offs_b, nb)):
        assert bool((offs % 16 == 0).all()) and int(offs.min()) == 0
        assert int(offs.max()) + chunk <= n  # never past the end
        hit = covered(offs, chunk, n)
        assert bool(hit[: n - 15].all())  # every byte but at most the last 15 (bulk requests are 16-byte multiples)
    assert len(offs_b) == l2._plan(b, chunk)[1] * l2.BLOCK


def test_small_buffers_and_bad_input():
    assert l2.prefetch_l2(torch.zeros(3, dtype=torch.int32), record=True).numel() == 0  # under one chunk
    assert l2.prefetch_l2(torch.zeros(3, dtype=torch.int32)) is None
    with pytest.raises(ValueError, match="mode 'tile': one of"):
        l2.prefetch_l2(torch.zeros(4096), mode="tile")
    with pytest.raises(ValueError, match="contiguous buffers only"):
        l2.prefetch_l2(torch.zeros(64, 64).t())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on two devices"):
            l2.prefetch_l2(torch.zeros(4096), torch.zeros(4096, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["line", "bulk"])
def test_requests_run_on_the_gpu_and_change_nothing(mode):
    """The requests compile and run (bulk needs sm_90) and leave the buffers as they were."""
    if mode == "bulk" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("bulk prefetch needs sm_90")
    a = torch.randint(-(2**31), 2**31 - 1, (1024, 1000), dtype=torch.int32, device="cuda")
    b = torch.randn(5000, device="cuda").half()
    a0, b0 = a.clone(), b.clone()
    l2.prefetch_l2(a, b, mode=mode)
    torch.cuda.synchronize()
    assert torch.equal(a, a0) and torch.equal(b, b0)
