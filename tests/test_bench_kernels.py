"""Smoke test of scripts/bench_kernels.py (a benchmark script, not a timed test).

Runs the script's ``main`` in ``--quick`` mode on two workloads and checks the shape of
the JSON it writes: every method has a record, every timed method a ratio to the best
baseline, auto's chosen strategy is reported. The numbers themselves are not checked.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # main() sets --threads for the whole process


def test_quick_run_writes_complete_json(bench, tmp_path, keep_threads, capsys):
    out = tmp_path / "kernels.json"
    returned = bench.main(["--quick", "--workloads", "W1,W3", "--repeats", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["workloads"].keys() == returned["workloads"].keys() == {"W1", "W3"}

    machine = data["machine"]
    for key in ("cpu_model", "logical_cores", "torch", "threads"):
        assert key in machine
    assert machine["threads"] == 2 and machine["torch"] == torch.__version__
    assert data["config"]["quick"] is True and data["config"]["repeats"] == 1

    method_names = [m.name for m in bench.METHODS]
    assert "distjac auto" in method_names and "row loop of grad" in method_names
    for name, wl in data["workloads"].items():
        assert list(wl["methods"]) == method_names, name
        assert wl["best_baseline"] in method_names
        assert wl["best_baseline_examples_per_s"] > 0
        assert isinstance(wl["auto_strategy"], str) and "/" in wl["auto_strategy"]
        for mname, rec in wl["methods"].items():
            where = f"{name} {mname}: {rec.get('reason')}"
            assert rec["status"] == "ok", where  # quick sizes: everything runs and matches
            assert len(rec["times_s"]) == 1, where
            assert rec["examples_per_s"] > 0, where
            assert rec["ratio_to_best_baseline"] > 0, where
        best = wl["methods"][wl["best_baseline"]]
        assert best["ratio_to_best_baseline"] == pytest.approx(1.0)

    table = capsys.readouterr().out
    assert "| method |" in table and "distjac auto" in table and "vmap(jacrev)" in table
    assert data["table_markdown"] in table


def test_bad_workload_is_rejected(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--workloads", "W9"])
    assert "unknown workload" in capsys.readouterr().err
