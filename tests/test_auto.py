"""mode="auto" on models and shapes it was never tuned on, and its measuring (NOTE
[measuring] in kernels.py) with a scripted clock: interleaved rounds, medians, the cost
model's prior, the measuring budget. No test here depends on how fast anything runs."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_close, randn, reference_batch_jacobian
from torch import nn

import distjac
from distjac import kernels
from distjac.kernels import Strategy, choose_strategy, clear_caches


def _seeded(build, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


# Beyond the benchmark's workloads: other activations and normalizations, pooling,
# several conv layers, a residual block (not a Sequential), a function with a closure.
UNSEEN = {
    "bn_eval_selu": (lambda: nn.Sequential(nn.Linear(5, 9), nn.BatchNorm1d(9), nn.SELU(), nn.Linear(9, 4)), (5,)),
    "groupnorm_conv_pool": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Hardswish(),
                                                  nn.MaxPool2d(2), nn.Conv2d(4, 3, 2), nn.AvgPool2d(2),
                                                  nn.Flatten(), nn.Linear(3, 5)), (2, 6, 6)),
    "three_convs_1d": (lambda: nn.Sequential(nn.Conv1d(1, 3, 3), nn.Mish(), nn.Conv1d(3, 3, 3, dilation=2),
                                             nn.LogSigmoid(), nn.Conv1d(3, 2, 1), nn.AdaptiveAvgPool1d(2),
                                             nn.Flatten()), (1, 12)),
    "rmsnorm_like_softmax": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=-1), nn.Linear(6, 6),
                                                   nn.LayerNorm(6)), (4,)),
}


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


UNSEEN["residual"] = (_Residual, (6,))


CASES = [(name, b) for name in sorted(UNSEEN) for b in (3, 40)] + [("bn_eval_selu", 20000), ("residual", 20000),
                                                                   ("groupnorm_conv_pool", 3000)]


@pytest.mark.parametrize("name, b", CASES)
def test_auto_equals_rev_on_unseen_models_and_batches(name, b):
    build, shape = UNSEEN[name]
    fn = _seeded(build).double()
    x = randn(b, *shape, seed=b, dtype=torch.float64)
    jac = distjac.batch_jacobian(fn, x, mode="auto")
    rev = distjac.batch_jacobian(fn, x, mode="rev")
    assert_close(jac, rev, msg=name)
    assert_close(jac[:3], reference_batch_jacobian(fn, x[:3]), msg=name)


@pytest.mark.parametrize("name", ["bn_eval_selu", "residual"])
def test_measured_choice_is_right_on_other_batch_sizes(monkeypatch, name):
    """A choice measured at one batch size is not reused across power-of-two buckets, and
    each is right (equal to rev) at its own size."""
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    clear_caches()
    build, shape = UNSEEN[name]
    fn = _seeded(build)
    recs = []
    for b in (5, 70, 700):
        x = randn(b, *shape, seed=b)
        assert_close(distjac.batch_jacobian(fn, x, mode="auto"), distjac.batch_jacobian(fn, x, mode="rev"))
        recs.append(choose_strategy(fn, x, mode="auto").record)
    assert [r.how for r in recs] == ["cached"] * 3  # each measured by its own first call
    assert len({r.key for r in recs}) == 3


# --------------------------------------------------------------------------------------
# The race, with a scripted clock
# --------------------------------------------------------------------------------------


def _scripted(monkeypatch, times: dict, *, abandon: bool = False):
    """Replace the clock of one run: ``times[str(strategy)]`` yields its seconds per example;
    with ``abandon``, a run whose scripted time passes its limit is stopped, as
    ``_time_once`` does."""
    its = {k: iter(v) if not isinstance(v, float) else itertools.repeat(v) for k, v in times.items()}
    calls: list[str] = []

    def fake(fn, xs, s, out_shape, call, limit_s=None):
        calls.append(str(s))
        t = next(its[str(s)])
        if abandon and limit_s is not None and t * xs.shape[0] > limit_s:
            raise kernels._AbandonedError(t * xs.shape[0])
        return t

    monkeypatch.setattr(kernels, "_time_once", fake)
    return calls


def _race(m=4, n=4):
    log, notes = [], []
    return kernels._Race(None, (m,), "t", m, n, log, notes), log, notes


def test_one_noisy_sample_cannot_pick_a_much_slower_candidate(monkeypatch):
    fast, slow = Strategy("rev", vectorize=False), Strategy("fwd", vectorize=False)
    # slow's first sample is a fluke 100x faster than it really is
    _scripted(monkeypatch, {str(fast): 1.0, str(slow): iter([0.01, 10.0, 10.0, 10.0, 10.0])})
    race, log, _ = _race()
    times = race.run([fast, slow], torch.zeros(4, 4))
    assert min(times, key=times.get) == fast


def test_a_slowed_run_of_the_leader_does_not_stop_it(monkeypatch):
    """AUTO_ABANDON stops runs past 4x another candidate's fastest: a hopeless loop is
    stopped, but the leader's own run slowed 10x by other load is not (it once was, and
    the race ended with no candidate at all)."""
    fast, slow = Strategy("fwd", vectorize=True), Strategy("fwd", vectorize=False)
    _scripted(monkeypatch, {str(fast): iter([1.0, 10.0, 1.0, 1.0, 1.0]), str(slow): 50.0}, abandon=True)
    race, _, notes = _race()
    times = race.run([fast, slow], torch.zeros(4, 4))
    assert set(times) == {fast}, (times, notes)
    assert any(n.startswith(f"{slow}: stopped after") for n in notes), notes
    assert not any(n.startswith(f"{fast}: stopped") for n in notes), notes


def test_a_cold_first_run_does_not_drop_the_fastest_candidate(monkeypatch):
    """A candidate stopped on its first run (one-off costs, or a burst of other load)
    gets one more run: the chain once left a loaded race that way, though it was the
    fastest. Stopped twice, it is dropped."""
    rev, chain = Strategy("rev", vectorize=False), Strategy("chain", vectorize=False)
    hopeless = Strategy("fwd", vectorize=False)
    _scripted(monkeypatch, {str(rev): 1.0, str(chain): iter([9.0, 0.5, 0.5, 0.5, 0.5, 0.5]), str(hopeless): 9.0},
              abandon=True)
    race, _, notes = _race()
    times = race.run([rev, chain, hopeless], torch.zeros(4, 4))
    assert min(times, key=times.get) == chain, (times, notes)
    assert hopeless not in times
    assert sum(n.startswith(f"{hopeless}: stopped after") for n in notes) == 2, notes
    assert any(n.startswith(f"{chain}: stopped after") and "one more try" in n for n in notes), notes


def test_rounds_are_interleaved_and_stop_when_the_leader_separates(monkeypatch):
    a, b, c = Strategy("rev", vectorize=False), Strategy("fwd", vectorize=False), Strategy("fwd", vectorize=True)
    calls = _scripted(monkeypatch, {str(a): 1.0, str(b): 1.2, str(c): 1.1})
    race, _, _ = _race()
    race.run([a, b, c], torch.zeros(4, 4))
    # two rounds (the minimum), each starting one candidate later
    assert calls == [str(a), str(b), str(c), str(b), str(c), str(a)]


def test_the_prior_keeps_measuring_when_sizes_say_the_leader_is_far_slower(monkeypatch):
    """Reverse mode with 64 outputs against forward mode with 4 inputs: the cost model puts
    rev 16x slower; a rev that leads anyway must keep leading over every round."""
    rev, fwd = Strategy("rev", vectorize=False), Strategy("fwd", vectorize=False)
    calls = _scripted(monkeypatch, {str(rev): 0.9, str(fwd): 1.0})
    race, _, _ = _race(m=64, n=4)
    times = race.run([rev, fwd], torch.zeros(4, 4))
    assert calls.count(str(rev)) == kernels.AUTO_MAX_ROUNDS
    assert min(times, key=times.get) == rev  # measured consistently: the measurement wins


def test_hopeless_candidates_are_dropped(monkeypatch):
    a, b = Strategy("rev", vectorize=False), Strategy("fwd", vectorize=False)
    calls = _scripted(monkeypatch, {str(a): iter([1.0, 1.3, 0.8, 1.2, 1.0]), str(b): 5.0})
    race, _, _ = _race()
    race.run([a, b], torch.zeros(4, 4))
    assert calls.count(str(b)) == 2  # the minimum of rounds, then dropped


def test_first_call_measuring_is_bounded_by_the_work_it_serves(monkeypatch):
    """A batch whose whole work is tiny next to what stage two would cost stops after the
    pilot, and the record says so; the answer is still right."""
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "AUTO_MEASURE_SHARE", 1e-6)
    clear_caches()
    fn = _seeded(UNSEEN["residual"][0])
    x = randn(600, 6, seed=1)
    s = choose_strategy(fn, x, mode="auto", compiled=False)
    assert any(n.startswith("measuring stopped after stage one") for n in s.record.notes), s.record
    assert not any("on 600 rows" in t for t, _ in s.record.times)
    assert_close(distjac.batch_jacobian(fn, x, mode="auto"), distjac.batch_jacobian(fn, x, mode="rev"))


def _table_clock(monkeypatch, seconds_of):
    """Replace the clock of one run by ``seconds_of(strategy)`` (seconds per example);
    returns the list of strategies timed."""
    timed: list[Strategy] = []

    def fake(fn, xs, s, out_shape, call, limit_s=None):
        timed.append(s)
        return seconds_of(s)

    monkeypatch.setattr(kernels, "_time_once", fake)
    return timed


def _mixing():
    w = torch.linspace(-1.0, 1.0, 36).reshape(6, 6)
    return lambda t: torch.tanh(t @ w.to(t.dtype))


def _saves_a_lot():
    """(B, 6) -> (B, 6), saving a (6, 4096) tanh output per example for its backward."""
    big = torch.linspace(-1.0, 1.0, 6 * 4096).reshape(6, 4096)
    return lambda t: torch.tanh(t[:, :, None] * big.to(t.dtype)).sum(-1)


@pytest.mark.parametrize("saves", ["little", "a lot"])
def test_a_loop_chosen_from_the_pilot_alone_takes_blocks_by_its_working_set(monkeypatch, saves):
    """Measuring stopped after stage one: a row loop runs the most rows whose saved
    activations fit AUTO_LOOP_BLOCK_BYTES, never fewer than the pilot's (a block of 128,
    below the pilot and never timed, once made softmax's loop 12x slower than the whole
    batch; the whole batch made W4's 3.3x slower than blocks of 256)."""
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "AUTO_MEASURE_SHARE", 1e-6)
    clear_caches()
    _table_clock(monkeypatch, lambda s: 1.0 if (s.mode, s.vectorize) == ("rev", False) else 3.0)
    fn = _mixing() if saves == "little" else _saves_a_lot()
    x = randn(4000, 6, seed=3)
    s = choose_strategy(fn, x, compiled=False)
    assert any(n.startswith("measuring stopped after stage one") for n in s.record.notes), s.record
    assert (s.mode, s.vectorize) == ("rev", False), s
    if saves == "little":
        assert s.block is None, s
    else:
        per_example = 6 * 4096 * 4
        pilot = max(kernels.AUTO_PILOT_MIN_ROWS, 2048 // kernels.AUTO_PILOT_FRACTION)
        assert s.block == max(pilot, kernels.AUTO_LOOP_BLOCK_BYTES // per_example) < 4000, s


@pytest.mark.parametrize("rows", [40, 600])
def test_vectorized_reverse_mode_is_a_cpu_candidate_only_where_the_pilot_is_the_call(monkeypatch, rows):
    """On a CPU, vmap over output rows is measured only where the pilot is the whole call
    (a smaller sample flatters it); at 64 rows it was the fastest way on several models."""
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    clear_caches()
    timed = _table_clock(monkeypatch, lambda s: 1.0 if (s.mode, s.vectorize) == ("rev", True) else 2.0)
    fn, x = _mixing(), randn(rows, 6, seed=4)
    s = choose_strategy(fn, x, compiled=False)
    vmap_rev = [t for t in timed if (t.mode, t.vectorize) == ("rev", True)]
    if rows <= kernels.AUTO_PILOT_MIN_ROWS:
        assert vmap_rev and (s.mode, s.vectorize) == ("rev", True), s.record
    else:
        assert not vmap_rev and not (s.mode == "rev" and s.vectorize), s.record
    assert_close(distjac.batch_jacobian(fn, x), reference_batch_jacobian(fn, x))


def test_where_the_pilot_is_the_whole_sample_stage_one_decides(monkeypatch):
    """A call no larger than the pilot is not timed twice on the same rows: a load spike in
    a re-timing cannot overturn what the pilot race measured."""
    monkeypatch.setattr(kernels, "AUTO_MEASURE_MIN_ELEMENTS", 1)
    clear_caches()
    races = []
    run = kernels._Race.run

    def counted(self, *args, **kwargs):
        races.append(1)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernels._Race, "run", counted)
    # The vectorized reverse pass leads the pilot race; any later race sees it 10x slower.
    _table_clock(monkeypatch, lambda s: (1.0 if len(races) == 1 else 10.0) if (s.mode, s.vectorize) == ("rev", True)
                 else 2.0)
    fn, x = _mixing(), randn(40, 6, seed=4)
    s = choose_strategy(fn, x, compiled=False)
    assert (s.mode, s.vectorize) == ("rev", True) and len(races) == 1, s.record
    assert "stage two not needed: the pilot was the whole sample" in s.record.notes
    assert_close(distjac.batch_jacobian(fn, x), reference_batch_jacobian(fn, x))
