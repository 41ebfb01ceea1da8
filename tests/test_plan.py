"""The shard plan: pure, from shapes alone (no tensors, no Ray)."""

from __future__ import annotations

import json

import pytest

from distjac import OptionError, ShapeError, ShardPlan, make_plan
from distjac.plan import (
    DEFAULT_SHARD_BYTES,
    MIN_SHARD_BYTES,
    default_shard_size,
    format_bytes,
)


def covered(plan: ShardPlan) -> list[int]:
    rows = []
    for start, stop in plan:
        assert start < stop
        rows.extend(range(start, stop))
    return rows


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 65, 1000, 4097])
@pytest.mark.parametrize("shard_size", [1, 3, 64, None])
def test_every_row_in_exactly_one_shard(rows, shard_size):
    plan = make_plan(rows, (5,), (3,), shard_size=shard_size)
    assert covered(plan) == list(range(rows))
    assert len(plan) == len(list(plan))
    for i, (start, stop) in enumerate(plan):
        assert plan.shard_of(start) == i and plan.shard_of(stop - 1) == i
        assert stop - start == plan.shard_size or i == len(plan) - 1


def test_fixed_shard_size_keeps_the_remainder_last():
    plan = make_plan(10, (4,), (3,), shard_size=4)
    assert list(plan) == [(0, 4), (4, 8), (8, 10)]
    assert plan.bounds(2) == (8, 10)
    with pytest.raises(IndexError, match="3 shards"):
        plan.bounds(3)


def test_empty_batch_has_no_shards():
    plan = make_plan(0, (4,), (3,))
    assert len(plan) == 0 and list(plan) == []
    assert plan.driver_peak_bytes == plan.driver_overhead
    assert "0 shards x" in str(plan)


def test_bytes_per_shard():
    plan = make_plan(100, (8, 2), (3, 5), in_itemsize=8, shard_size=10)
    assert plan.in_row_bytes == 16 * 8
    assert plan.out_row_bytes == 15 * 16 * 8
    assert plan.shard_in_bytes() == 10 * 16 * 8
    assert plan.shard_out_bytes() == 10 * (15 * 16 * 8 + 8)  # + int64 row ids
    assert plan.total_out_bytes == 100 * 15 * 16 * 8
    assert plan.jacobian_shape == (100, 3, 5, 8, 2)


def test_out_itemsize_defaults_to_in_itemsize_and_can_differ():
    assert make_plan(4, (2,), (2,), in_itemsize=8).out_itemsize == 8
    assert make_plan(4, (2,), (2,), in_itemsize=2, out_itemsize=4).out_row_bytes == 16


def test_driver_peak_is_output_plus_in_flight_shards_plus_constant_when_gathering():
    plan = make_plan(1000, (4,), (4,), shard_size=100, parallel_iterations=3)
    shard = plan.shard_in_bytes() + plan.shard_out_bytes()
    assert plan.in_flight == 3
    assert plan.driver_peak_bytes == plan.total_out_bytes + 3 * shard + plan.driver_overhead
    streamed = make_plan(1000, (4,), (4,), shard_size=100, parallel_iterations=3, gather=False)
    assert streamed.driver_peak_bytes == plan.driver_overhead  # workers read and write their own shards


def test_in_flight_is_capped_by_the_number_of_shards():
    assert make_plan(10, (2,), (2,), shard_size=5, parallel_iterations=16).in_flight == 2


def test_worker_peak():
    plan = make_plan(1000, (4,), (4,), shard_size=100)
    # the pipeline's three shards: two inputs, the Jacobian computing and the one written (twice)
    assert plan.worker_peak_bytes == plan.worker_overhead + 2 * plan.shard_in_bytes() + 3 * plan.shard_out_bytes()


def test_default_shard_size_comes_from_the_memory_budget():
    # W1 (64 -> 32, float32): 8 KiB of Jacobian per row, 32 MiB shards = 4096 rows.
    plan = make_plan(65536, (64,), (32,), num_workers=2)
    assert plan.shard_size == DEFAULT_SHARD_BYTES // (32 * 64 * 4) == 4096
    assert len(plan) == 16
    # Twice the bytes per row (float64): half the rows per shard.
    assert make_plan(65536, (64,), (32,), in_itemsize=8, num_workers=2).shard_size == 2048
    # A custom budget.
    assert make_plan(65536, (64,), (32,), shard_bytes=8 << 20).shard_size == 1024


def test_small_batches_are_split_for_the_workers_but_not_below_the_floor():
    per_row = 1 << 10  # 1 KiB of Jacobian per row
    # 40 MiB in all: 2 workers x 2 shards of 10 MiB (above the 4 MiB floor).
    assert default_shard_size(40 << 10, per_row, num_workers=2) == 10 << 10
    # 6 MiB in all: splitting 4 ways would make 1.5 MiB shards; the floor keeps 4 MiB.
    assert default_shard_size(6 << 10, per_row, num_workers=2) == MIN_SHARD_BYTES // per_row
    # Fewer rows than the floor: one shard.
    assert default_shard_size(100, per_row, num_workers=8) == 100
    # Huge rows: one row per shard, never zero.
    assert default_shard_size(10, 1 << 30) == 1


def test_summary_is_json_and_str_is_a_table():
    plan = make_plan(65536, (64,), (32,), num_workers=2)
    summary = json.loads(json.dumps(plan.summary()))
    assert summary["shards"] == 16 and summary["shard_size"] == 4096
    assert summary["jacobian_shape"] == [65536, 32, 64]
    text = str(plan)
    for part in ("ShardPlan", "65,536", "16 shards x 4,096 rows", "32.0 MiB", "512.0 MiB", "driver peak",
                 "worker peak"):
        assert part in text


def test_plan_is_a_frozen_comparable_value():
    a = make_plan(100, (4,), (3,), shard_size=10)
    assert a == make_plan(100, (4,), (3,), shard_size=10)
    assert a != make_plan(100, (4,), (3,), shard_size=20)
    with pytest.raises(AttributeError):
        a.rows = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rows": -1}, OptionError, "rows=-1"),
        ({"shard_size": 0}, OptionError, "shard_size=0"),
        ({"parallel_iterations": 0}, OptionError, "parallel_iterations=0"),
        ({"num_workers": 1.5}, OptionError, "num_workers=1.5"),
        ({"in_shape": (-2,)}, ShapeError, "negative"),
        ({"out_shape": 3}, ShapeError, "sequence of sizes"),
    ],
)
def test_bad_values_are_rejected(kwargs, error, match):
    args = {"rows": 10, "in_shape": (2,), "out_shape": (2,)} | kwargs
    with pytest.raises(error, match=match):
        make_plan(**args)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 << 20) == "3.0 MiB"
    assert format_bytes(1536 << 20) == "1.5 GiB"
