"""Large CPU results on transparent huge pages (distjac/_alloc.py, NOTE [huge pages]):
the advice is read back from the kernel's own record of the mapping (/proc/self/smaps
VmFlags "hg"), never inferred from a time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HUGE_PAGES, assert_close, cube, huge_page_flags, reference_batch_jacobian

from distjac import _alloc, models
from distjac.kernels import Strategy, run_strategy

needs_thp = pytest.mark.skipif(not HUGE_PAGES, reason="transparent huge pages are a Linux kernel feature")


@needs_thp
def test_a_large_result_is_advised_and_a_small_one_is_left_alone():
    big = _alloc.empty((_alloc.ADVISE_FROM // 4 + 4096,), dtype=torch.float32, device="cpu")
    assert "hg" in huge_page_flags(big)
    zeros = _alloc.zeros((3, _alloc.ADVISE_FROM // 8), dtype=torch.float64, device="cpu")
    assert "hg" in huge_page_flags(zeros) and not zeros.any()
    small = _alloc.empty((1 << 20,), dtype=torch.float32, device="cpu")  # 4 MiB: glibc's heap
    assert "hg" not in huge_page_flags(small)


@needs_thp
@pytest.mark.parametrize("strategy", [Strategy("diag"), Strategy("rev", vectorize=False, block=16),
                                      Strategy("fwd", block=24), Strategy("rev", block=64, chunk=128)])
def test_the_kernels_results_are_advised_and_right(strategy):
    # 40 x 512 x 512 float32 = 40 MiB: above the threshold.
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(0))
    jac = run_strategy(cube, x, strategy)
    assert "hg" in huge_page_flags(jac)
    assert_close(jac, reference_batch_jacobian(cube, x))


@needs_thp
def test_a_chain_in_blocks_writes_an_advised_result():
    torch.manual_seed(0)
    net = models.mlp([16, 128, 1024]).eval()  # 1024 x 16 per example
    x = torch.randn(600, 16)  # 600 x 1024 x 16 float32 = 37.5 MiB, in capped blocks
    jac = run_strategy(net, x, Strategy("chain", block=1024))
    assert "hg" in huge_page_flags(jac)
    assert_close(jac[:7], reference_batch_jacobian(net, x[:7]))


@pytest.mark.parametrize("offset", [0, 64, (2 << 20) - 64])
def test_the_advice_covers_whole_pages_inside_the_tensor_only(monkeypatch, offset):
    """madvise is given only whole huge pages that lie inside the tensor's memory
    (a recording stand-in, so this runs on every platform)."""
    calls = []
    monkeypatch.setattr(_alloc, "_madvise", lambda: (lambda a, n, advice: calls.append((a, n, advice)) or 0,
                                                     _alloc.HUGE_PAGE))
    t = _alloc.empty((_alloc.ADVISE_FROM // 4 + 4096,), dtype=torch.float32, device="cpu")
    start, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    (a, n, advice), = calls
    assert advice == 14 and a % _alloc.HUGE_PAGE == 0 and n % _alloc.HUGE_PAGE == 0 and n > 0
    assert start <= a and a + n <= start + nbytes
    assert a - start < _alloc.HUGE_PAGE and start + nbytes - (a + n) < _alloc.HUGE_PAGE  # nothing left out
    first, last = _alloc.huge_range(_alloc.HUGE_PAGE * 7 + offset, _alloc.HUGE_PAGE * 3, _alloc.HUGE_PAGE)
    assert first >= _alloc.HUGE_PAGE * 7 + offset and last <= _alloc.HUGE_PAGE * 10 + offset
    assert (last - first) // _alloc.HUGE_PAGE == (3 if offset == 0 else 2)
    calls.clear()
    _alloc.empty((1 << 20,), dtype=torch.float32, device="cpu")  # 4 MiB: never advised
    assert calls == []


def test_results_made_inside_a_torch_func_transform_are_left_alone():
    """Inside torch.func transforms a result has no storage of its own to advise."""
    from distjac.structure import dense_from_diagonal

    d = torch.randn(40, 512, generator=torch.Generator().manual_seed(2))  # a 40 MiB dense result
    g = torch.func.grad(lambda d: dense_from_diagonal(d).sum())(d)
    assert torch.equal(g, torch.ones_like(d))
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(3))
    _, tangent = torch.func.jvp(lambda x: run_strategy(cube, x, Strategy("fwd", block=24)), (x,), (torch.ones_like(x),))
    assert_close(tangent, torch.diag_embed(6 * x))


@needs_thp
def test_the_switch_turns_the_advice_off():
    code = (
        "import torch, sys; sys.path.insert(0, 'tests');"
        "from helpers import huge_page_flags; from distjac import _alloc;"
        "t = _alloc.empty((_alloc.ADVISE_FROM // 4 + 4096,), dtype=torch.float32, device='cpu');"
        "print('hg' in huge_page_flags(t))"
    )
    root = Path(__file__).resolve().parents[1]
    for value, advised in (("0", "False"), ("1", "True")):
        env = {**os.environ, "DISTJAC_HUGE_PAGES": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                             timeout=120, check=True)
        assert out.stdout.strip() == advised, out.stderr
