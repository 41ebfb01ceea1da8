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

pytestmark = pytest.mark.skipif(not HUGE_PAGES, reason="transparent huge pages are a Linux kernel feature")


def test_a_large_result_is_advised_and_a_small_one_is_left_alone():
    big = _alloc.empty((_alloc.ADVISE_FROM // 4 + 4096,), dtype=torch.float32, device="cpu")
    assert "hg" in huge_page_flags(big)
    zeros = _alloc.zeros((3, _alloc.ADVISE_FROM // 8), dtype=torch.float64, device="cpu")
    assert "hg" in huge_page_flags(zeros) and not zeros.any()
    small = _alloc.empty((1 << 20,), dtype=torch.float32, device="cpu")  # 4 MiB: glibc's heap
    assert "hg" not in huge_page_flags(small)


@pytest.mark.parametrize("strategy", [Strategy("diag"), Strategy("rev", vectorize=False, block=16),
                                      Strategy("fwd", block=24), Strategy("rev", block=64, chunk=128)])
def test_the_kernels_results_are_advised_and_right(strategy):
    # 40 x 512 x 512 float32 = 40 MiB: above the threshold.
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(0))
    jac = run_strategy(cube, x, strategy)
    assert "hg" in huge_page_flags(jac)
    assert_close(jac, reference_batch_jacobian(cube, x))


def test_a_chain_covering_the_batch_writes_an_advised_result():
    torch.manual_seed(0)
    net = models.mlp([16, 128, 1024]).eval()  # 1024 x 16 per example
    x = torch.randn(600, 16)  # 600 x 1024 x 16 float32 = 37.5 MiB
    jac = run_strategy(net, x, Strategy("chain", block=1024))
    assert "hg" in huge_page_flags(jac)
    assert_close(jac[:7], reference_batch_jacobian(net, x[:7]))


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
