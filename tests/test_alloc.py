"""Large CPU results on transparent huge pages (distjac/_alloc.py, NOTE [huge pages]):
the advice is read back from the kernel's own record of the mapping (/proc/self/smaps
VmFlags "hg"), never inferred from a time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import HUGE_PAGES, assert_close, cube, huge_page_flags, reference_batch_jacobian

from distjac import _alloc, models
from distjac.kernels import Strategy, run_strategy

needs_thp = pytest.mark.skipif(not HUGE_PAGES, reason="transparent huge pages are a Linux kernel feature")


@pytest.fixture
def always(monkeypatch):
    """Advise every large result, as DISTJAC_HUGE_PAGES=1 does, whatever the host does with
    free pages (the rule for hosts that take them back is tested on its own below)."""
    monkeypatch.setattr(_alloc, "_setting", lambda: "always")


def recording(monkeypatch) -> list:
    """A stand-in for madvise that records its calls (so a test runs on every platform)."""
    calls = []
    monkeypatch.setattr(_alloc, "_madvise", lambda: (lambda a, n, advice: calls.append((a, n, advice)) or 0,
                                                     _alloc.HUGE_PAGE))
    return calls


@needs_thp
@pytest.mark.usefixtures("always")
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
@pytest.mark.usefixtures("always")
def test_the_kernels_results_are_advised_and_right(strategy):
    # 40 x 512 x 512 float32 = 40 MiB: above the threshold.
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(0))
    jac = run_strategy(cube, x, strategy)
    assert "hg" in huge_page_flags(jac)
    assert_close(jac, reference_batch_jacobian(cube, x))


@needs_thp
@pytest.mark.usefixtures("always")
def test_a_chain_in_blocks_writes_an_advised_result():
    torch.manual_seed(0)
    net = models.mlp([16, 128, 1024]).eval()  # 1024 x 16 per example
    x = torch.randn(600, 16)  # 600 x 1024 x 16 float32 = 37.5 MiB, in capped blocks
    jac = run_strategy(net, x, Strategy("chain", block=1024))
    assert "hg" in huge_page_flags(jac)
    assert_close(jac[:7], reference_batch_jacobian(net, x[:7]))


@pytest.mark.parametrize("offset", [0, 64, (2 << 20) - 64])
@pytest.mark.usefixtures("always")
def test_the_advice_covers_whole_pages_inside_the_tensor_only(monkeypatch, offset):
    """madvise is given only whole huge pages that lie inside the tensor's memory."""
    calls = recording(monkeypatch)
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
def test_the_switch_turns_the_advice_off_or_always_on():
    code = (
        "import torch, sys; sys.path.insert(0, 'tests');"
        "from helpers import huge_page_flags; from distjac import _alloc;"
        "t = _alloc.empty((_alloc.ADVISE_FROM // 4 + 4096,), dtype=torch.float32, device='cpu');"
        "print('hg' in huge_page_flags(t))"
    )
    root = Path(__file__).resolve().parents[1]
    # A process's first large result: where the host takes free pages back, plain pages.
    first = str(not _alloc._free_page_reporting())
    for value, advised in (("0", "False"), ("1", "True"), ("auto", first), ("", first)):
        env = {**os.environ, "DISTJAC_HUGE_PAGES": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                             timeout=120, check=True)
        assert out.stdout.strip() == advised, (value, out.stderr)


@pytest.mark.parametrize(("bits", "reports"), [("0110010100000000", True), ("0110000100000000", False),
                                               ("01100", False), (None, False)])
def test_free_page_reporting_is_read_from_the_balloon_devices_features(monkeypatch, tmp_path, bits, reports):
    """Bit 5 (VIRTIO_BALLOON_F_REPORTING) of any virtio balloon's features; no device, no."""
    if bits is not None:
        (tmp_path / "virtio0").mkdir()
        (tmp_path / "virtio0" / "features").write_text(bits + "\n")
        (tmp_path / "module").mkdir()  # the driver's other entries have no features file
    monkeypatch.setattr(_alloc, "_BALLOON", str(tmp_path if bits is not None else tmp_path / "none"))
    _alloc._free_page_reporting.cache_clear()
    try:
        assert _alloc._free_page_reporting() is reports
    finally:
        monkeypatch.undo()
        _alloc._free_page_reporting.cache_clear()


def test_where_the_host_takes_free_pages_back_only_results_after_a_recent_free_are_advised(monkeypatch):
    """NOTE [huge pages]: plain pages for a first result and after a pause; advice where
    results at least as large were freed within RECENT_S; a view keeps memory in use."""
    calls = recording(monkeypatch)
    monkeypatch.setattr(_alloc, "_setting", lambda: "auto")
    monkeypatch.setattr(_alloc, "_free_page_reporting", lambda: True)
    monkeypatch.setattr(_alloc, "_freed", _alloc._Freed())
    monkeypatch.setattr(_alloc, "RECENT_S", 0.5)
    n = _alloc.ADVISE_FROM // 4 + 4096

    def result(count=n):
        before = len(calls)
        t = _alloc.empty((count,), dtype=torch.float32, device="cpu")
        return t, len(calls) > before

    t, advised = result()
    assert not advised  # nothing freed yet
    view = t[:10]
    del t
    assert not result()[1]  # the view holds the first one's memory; this one is freed at once
    del view
    t, advised = result()
    assert advised  # two results' memory was given back just now
    del t
    big, advised = result(4 * n)
    assert not advised  # what was freed lately is smaller than this
    del big
    time.sleep(0.7)
    assert not result()[1]  # after a pause the freed pages count as reported
    # One free serves one new result: the pages it gave back cannot back two.
    time.sleep(0.7)
    _, _ = result()  # freed at once
    first, a1 = result()
    second, a2 = result()
    assert a1 and not a2
