"""Jobs as people run them (issue 12): their own model files, live models, models with
several outputs, progress they can watch, quick starts, and messages that say what to do.

CLI runs go through a real subprocess (``python -m distjac.cli``) from a folder that is
not the config's, with real files; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import distjac
from distjac.config import JobSpec, ModelSpec, build_model, find_factory_module, resolve_factory
from distjac.errors import ConfigError, SourceError
from distjac.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL_FILE = '''
import torch
from torch import nn


class TwoHeads(nn.Module):
    """A model with several outputs, as Hugging Face-style models have."""

    def __init__(self, width=3, classes=2):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(width, 4)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"logits": self.head(h), "hidden": h}


def make_cnn(width=3, classes=2):
    return TwoHeads(width, classes)


def broken(width=3):
    raise RuntimeError("cannot build")
'''


def _cli(*args, cwd=None, env=None):
    full_env = {**os.environ, "PYTHONPATH": ROOT}
    full_env.pop("DISTJAC_PROGRESS_INTERVAL", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "distjac.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=300, cwd=cwd)


def _project(tmp_path, factory="models/mymodels.py:make_cnn", output="logits", **engine):
    """A user's project: configs/job.yaml, models/mymodels.py; returns the config path."""
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "mymodels.py").write_text(MODEL_FILE)
    (tmp_path / "configs" / "mymodels.py").write_text(MODEL_FILE)  # for "mymodels:make_cnn"
    job = {
        "model": {"factory": factory, "kwargs": {"width": 3}, "output": output},
        "data": {"kind": "synthetic", "rows": 40, "shape": [3], "seed": 0},
        "jacobian": {"mode": "rev"},
        "engine": {"num_workers": 0, "shard_size": 10, **engine},
        "output": {"path": str(tmp_path / "out")},
    }
    if factory.startswith("models/"):
        job["model"]["factory"] = "../" + factory  # relative to the config's folder
    path = tmp_path / "configs" / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


# ------------------------------------------------------------------ item 1: model files


def test_run_a_model_file_beside_the_config_with_progress_lines(tmp_path):
    """The user's own file, relative to the config's folder; stderr is a pipe, so progress
    comes as lines; model.output picks the logits."""
    config = _project(tmp_path)
    elsewhere = tmp_path / "configs"
    r = _cli("run", "job.yaml", cwd=str(elsewhere), env={"DISTJAC_PROGRESS_INTERVAL": "0.05"})
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("distjac: ") and " rows" in ln]
    assert lines, r.stderr
    assert "40/40 rows (100%)" in lines[-1] and "4/4 shards" in lines[-1], lines
    assert "rows/s" in r.stderr
    jac = distjac.read_result(str(tmp_path / "out"))
    assert jac.shape == (40, 2, 3)
    assert not (elsewhere / "out").exists()

    r = _cli("run", config, "--no-progress", "--overwrite", cwd=str(elsewhere))
    assert r.returncode == 0, r.stderr
    assert not [ln for ln in r.stderr.splitlines() if " rows (" in ln], r.stderr


def test_run_a_model_file_from_any_folder(tmp_path):
    config = _project(tmp_path)
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    r = _cli("run", config, "--no-progress", cwd=str(deep))
    assert r.returncode == 0, r.stderr
    assert distjac.read_result(str(tmp_path / "out")).shape == (40, 2, 3)


def test_module_beside_the_config_and_absolute_paths(tmp_path):
    config = _project(tmp_path, factory="mymodels:make_cnn")
    spec = JobSpec.from_yaml(config)
    assert spec.base_dir == str(tmp_path / "configs")
    find_factory_module(spec.model)  # found beside the config, without importing it
    model = build_model(spec.model)
    assert model(torch.ones(2, 3)).shape == (2, 2)

    absolute = f"{tmp_path / 'models' / 'mymodels.py'}:make_cnn"
    a = resolve_factory(absolute)
    b = resolve_factory("../models/mymodels.py:make_cnn", str(tmp_path / "configs"))
    assert a is b  # one module per file, under a stable name
    assert a.__module__ in sys.modules and a.__module__.startswith("distjac_user_mymodels_")
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[a.__module__])
    try:
        again = cloudpickle.loads(cloudpickle.dumps(a))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[a.__module__])
    assert isinstance(again(), torch.nn.Module)

    # The spec hash names the file by its absolute path: the same however it is written.
    relative = JobSpec.from_yaml(_project(tmp_path, output=None))
    d = relative.to_dict()
    d["model"]["factory"] = absolute
    assert JobSpec.from_dict(d).spec_hash() == relative.spec_hash()


def test_missing_model_file_and_failing_factory_say_what_to_do(tmp_path):
    config = _project(tmp_path)
    spec = JobSpec.from_yaml(config)
    with pytest.raises(ConfigError, match=r"the file .*nope\.py does not exist \(a relative path is relative to "
                       r"the config's folder"):
        find_factory_module(ModelSpec("nope.py:f", base_dir=spec.base_dir))
    bad = ModelSpec("../models/mymodels.py:broken", {"width": 3}, base_dir=spec.base_dir)
    with pytest.raises(ConfigError, match=r"model.factory='../models/mymodels.py:broken' called with model.kwargs "
                       r"\{'width': 3\} raised RuntimeError: cannot build"):
        build_model(bad)


def test_live_models_and_their_hash():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    spec = JobSpec.from_dict({"model": net, "data": {"rows": 4, "shape": [3]}, "output": {"path": "o"}})
    assert spec.model.module is net
    built = build_model(spec.model)
    assert built is not net and not built.training and net.training  # the caller's model is untouched
    h = spec.spec_hash()
    assert h == JobSpec.from_dict({"model": {"module": net}, "data": {"rows": 4, "shape": [3]},
                                   "output": {"path": "o"}}).spec_hash()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert JobSpec.from_dict({"model": net, "data": {"rows": 4, "shape": [3]},
                              "output": {"path": "o"}}).spec_hash() != h

    def cube(x):
        return x * x * x

    s = JobSpec.from_dict({"model": cube, "data": {"rows": 4, "shape": [3]}, "output": {"path": "o"}})
    assert build_model(s.model) is cube and len(s.spec_hash()) == 16
    with pytest.raises(ConfigError, match="model.module and model.factory are both set"):
        JobSpec.from_dict({"model": {"module": cube, "factory": "distjac.models:cube"},
                           "data": {"rows": 4, "shape": [3]}, "output": {"path": "o"}})


@pytest.mark.parametrize("output, returns, message", [
    ("logits", {"logits": 1}, "picks a int"),
    ("scores", {"logits": torch.ones(2, 2), "hidden": torch.ones(2, 4)},
     r"without 'scores'; it holds 'logits', 'hidden'"),
    (2, (torch.ones(2, 2), torch.ones(2, 3)), r"a tuple of 2 values .*use an index in \[0, 2\)"),
    (0, torch.ones(2, 2), "an index picks from a tuple, list or dict"),
])
def test_model_output_errors_list_what_there_is(output, returns, message):
    spec = ModelSpec(module=lambda x: returns, output=output)
    with pytest.raises(ConfigError, match=message):
        build_model(spec)(torch.ones(2, 3))


def test_model_output_picks_a_tuple_entry_and_an_attribute():
    class Out:
        def __init__(self, x):
            self.logits, self.loss = x * 2, None

    assert torch.equal(build_model(ModelSpec(module=lambda x: (x, x * 3), output=1))(torch.ones(2, 2)),
                       torch.full((2, 2), 3.0))
    assert torch.equal(build_model(ModelSpec(module=lambda x: Out(x), output="logits"))(torch.ones(2, 2)),
                       torch.full((2, 2), 2.0))
    y = distjac.batch_jacobian(build_model(ModelSpec(module=lambda x: {"y": x * x}, output="y")),
                               torch.ones(2, 2), mode="rev")
    assert y.shape == (2, 2, 2)


# ------------------------------------------------------------------ item 8: names


def test_parallel_iterations_is_a_deprecated_alias(tmp_path):
    base = {"model": {"factory": "distjac.models:cube"}, "data": {"rows": 4, "shape": [2]},
            "output": {"path": str(tmp_path)}}
    with pytest.warns(FutureWarning, match="rename it to engine.max_in_flight"):
        spec = JobSpec.from_dict({**base, "engine": {"parallel_iterations": 3}})
    assert spec.engine.max_in_flight == 3 == spec.engine.parallel_iterations
    with pytest.raises(ConfigError, match="both set"):
        JobSpec.from_dict({**base, "engine": {"parallel_iterations": 3, "max_in_flight": 4}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spec.with_overrides(["engine.max_in_flight=5"]).engine.max_in_flight == 5
        assert "max_in_flight" in spec.to_dict()["engine"]
    cfg = tmp_path / "old.yaml"
    cfg.write_text(yaml.safe_dump({**base, "engine": {"parallel_iterations": 2}}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert JobSpec.from_yaml(cfg, ["engine.max_in_flight=6"]).engine.max_in_flight == 6


# ------------------------------------------------------------------ item 9: messages


def test_malformed_set_is_an_error(tmp_path):
    config = _project(tmp_path)
    with pytest.raises(ConfigError, match=r"--set 'model.kwargs.sizes=\[64, 256': the value .* is not valid YAML"):
        JobSpec.from_yaml(config, ["model.kwargs.sizes=[64, 256"])
    assert JobSpec.from_yaml(config, ["output.path=a:b"]).output.path == "a:b"  # a plain string stays one


def test_parquet_given_as_npy_and_list_columns(tmp_path):
    import pandas as pd

    x = np.random.default_rng(0).standard_normal((6, 4))
    pd.DataFrame({"id": range(6), "x": list(x)}).to_parquet(tmp_path / "d.parquet")
    from distjac.io.sources import open_source

    with pytest.raises(SourceError, match="looks like Parquet, not a .npy array; set data.kind: parquet"):
        open_source(distjac.config.DataSpec(kind="npy", path=str(tmp_path / "d.parquet")))
    src = open_source(distjac.config.DataSpec(kind="parquet", path=str(tmp_path / "d.parquet"), column="x"))
    assert src.shape == (4,) and src.lists
    np.testing.assert_allclose(src.read(1, 5).numpy(), x[1:5])
    shaped = open_source(distjac.config.DataSpec(kind="parquet", path=str(tmp_path / "d.parquet"), shape=(2, 2)))
    assert shaped.read(0, 6).shape == (6, 2, 2)
    with pytest.raises(SourceError, match=r"row 0 holds 4 values, but rows of shape \[3\] hold 3"):
        open_source(distjac.config.DataSpec(kind="parquet", path=str(tmp_path / "d.parquet"), shape=(3,))).read(0, 2)
    ragged = pa.table({"x": pa.array([[1.0, 2.0], [1.0, 2.0], [3.0]])})
    pq.write_table(ragged, tmp_path / "r.parquet")
    with pytest.raises(SourceError, match="row 2 holds 1 values"):
        open_source(distjac.config.DataSpec(kind="parquet", path=str(tmp_path / "r.parquet"))).read(0, 3)


def test_cli_messages_exit_2(tmp_path):
    config = _project(tmp_path)
    r = _cli("run", config, "--set", "model.kwargs.sizes=[64, 256")
    assert r.returncode == 2 and "is not valid YAML" in r.stderr, r.stderr
    (tmp_path / "file.txt").write_text("x")
    r = _cli("inspect", str(tmp_path / "file.txt"))
    assert r.returncode == 2 and "is a file, not a distjac output" in r.stderr and "Traceback" not in r.stderr


def test_ray_client_check_names_the_extra(tmp_path, monkeypatch):
    from distjac.config import check_address

    check_address(None)
    check_address("127.0.0.1:6379")
    engine_cls = distjac.Engine  # imported before nothing is importable
    monkeypatch.setattr(sys, "path", [str(tmp_path)])  # nothing importable: as if ray[client] were missing
    for name in [m for m in sys.modules if m == "grpc" or m.startswith("grpc.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ConfigError, match=r"needs ray\[client\] .*pip install 'distjac\[cluster\]'"):
        check_address("ray://head:10001")
    # The Engine checks it too, before it starts or joins Ray (no connection attempt).
    with pytest.raises(distjac.OptionError, match=r"distjac.Engine\(...\): address='ray://head:10001' connects "
                       r"through Ray Client, which needs ray\[client\]"):
        engine_cls(address="ray://head:10001")


# ------------------------------------------------------------------ item 3: quiet starts


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["run", "--help"]])
def test_version_and_help_import_neither_torch_nor_ray(args):
    code = (f"import sys\nfrom distjac.cli import main\nrc = main({args!r})\n"
            "print(rc, sorted(m for m in ('torch', 'ray', 'tqdm') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stdout


# ------------------------------------------------------------------ item 2: progress


def test_progress_lines_and_bar_choice(tmp_path):
    import io

    out = io.StringIO()
    p = Progress(100, 20, True, interval=3600, shards=10, shards_done=2, file=out)
    assert p.mode == "lines"
    p.update(30, shards=3)
    p.set_retries(1)
    p.close()
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("distjac: 50/100 rows (50%), ") and "rows/s" in last and "ETA" in last
    assert "5/10 shards" in last and "1 retried" in last
    quiet = io.StringIO()
    with Progress(10, progress=None, file=quiet) as q:  # library default off a terminal: nothing
        q.update(10)
    assert quiet.getvalue() == "" and q.mode == "off"
    finished = Progress(10, 10, True, interval=3600, file=out)  # every row done by an earlier run
    assert finished.line().startswith("distjac: 10/10 rows (100%), done in ")
    assert "starting" not in finished.line()
    finished.close()
    assert Progress(10, progress=False, file=out).mode == "off"


# ------------------------------------------------------------------ item 5: reading results


def test_read_result_as_tensor_and_interop(tmp_path):
    from job_helpers import tiny_spec

    from distjac.jobs import run_job

    spec = tiny_spec(tmp_path / "out", output={"format": "parquet"})
    run_job(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = distjac.read_result(str(tmp_path / "out"), rows=slice(0, 5), as_tensor=True)  # a view of one part
        every = distjac.read_result(str(tmp_path / "out"), as_tensor=True)
    assert isinstance(one, torch.Tensor) and one.shape == (5, 2, 3)
    assert torch.equal(every[:5], one)
    one[0] += 1  # writable

    # The one-liners of docs/jobs.md restore the Jacobian's shape from the flat lists.
    import duckdb
    import pandas as pd
    import polars as pl

    want = every.numpy()
    shape = json.loads((tmp_path / "out" / "_manifest.json").read_text())["info"]
    per_row = tuple(shape["output_shape"]) + tuple(shape["input_shape"])
    parts = str(tmp_path / "out" / "*.parquet")
    df = pd.read_parquet(str(tmp_path / "out")).sort_values("row")
    np.testing.assert_allclose(np.stack(df["jacobian"].map(lambda v: np.asarray(v).reshape(per_row))), want)
    rel = duckdb.sql(f"SELECT row, jacobian FROM read_parquet('{parts}') ORDER BY row").fetchnumpy()
    np.testing.assert_allclose(np.stack([np.asarray(v) for v in rel["jacobian"]]).reshape(-1, *per_row), want)
    pl_df = pl.read_parquet(parts).sort("row")
    np.testing.assert_allclose(pl_df["jacobian"].to_numpy().reshape(-1, *per_row), want)


def test_docs_show_the_user_jobs():
    text = open(os.path.join(ROOT, "docs", "jobs.md")).read()
    for needle in ("mymodels.py:make_cnn", "AWS_ENDPOINT_URL", "keep_columns", "model.output", "--no-progress",
                   "max_in_flight"):
        assert needle in text, needle
    rel = open(os.path.join(ROOT, "docs", "reliability.md")).read()
    assert "object store" in rel.lower()


def test_configs_use_max_in_flight():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        text = open(os.path.join(ROOT, "configs", name)).read()
        assert "parallel_iterations:" not in text, name


def test_rerunning_a_finished_job_starts_no_ray(tmp_path):
    config = _project(tmp_path)
    code = ("import sys\nfrom distjac.cli import main\n"
            f"assert main(['run', {config!r}, '--workers', '0', '--no-progress']) == 0\n"
            f"rc = main(['run', {config!r}, '--workers', '2', '--no-progress'])\n"
            "print(rc, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT}, cwd=str(tmp_path / "configs"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0 False", r.stdout
    assert "0 computed, 4 reused" in r.stdout


@pytest.mark.ray
def test_engine_runs_a_model_file(tmp_path, monkeypatch):
    """Workers get the user's factory and classes by value (a file no worker can import by
    name); model.output picks the logits there too."""
    config = _project(tmp_path)
    with distjac.Engine(num_workers=1, device="cpu", progress=False) as engine:
        report = engine.run(JobSpec.from_yaml(config))
    assert report["computed_shards"] == 4
    spec = JobSpec.from_yaml(config, [f"output.path={tmp_path / 'out2'}"])
    distjac.jobs.run_job(spec)  # in this process, for the reference
    np.testing.assert_allclose(distjac.read_result(str(tmp_path / "out")),
                               distjac.read_result(str(tmp_path / "out2")))


# ------------------------------------------------------------------ waiting on the runner's wiring


def test_a_job_reads_a_directory_of_npy_files(tmp_path):
    from distjac.jobs import run_job

    x = np.random.default_rng(1).standard_normal((23, 3)).astype(np.float32)
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "part-0.npy", x[:10])
    np.save(tmp_path / "d" / "part-1.npy", x[10:])
    spec = JobSpec.from_dict({
        "model": {"factory": "distjac.models:mlp", "kwargs": {"sizes": [3, 5, 2]}},
        "data": {"kind": "npy", "path": str(tmp_path / "d")},
        "engine": {"num_workers": 0, "shard_size": 7, "progress": False},
        "output": {"path": str(tmp_path / "out")},
    })
    run_job(spec)
    model = distjac.models.mlp([3, 5, 2])
    np.testing.assert_allclose(distjac.read_result(str(tmp_path / "out")),
                               distjac.batch_jacobian(model, torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_keep_columns_reach_the_output(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.feather as feather

    from distjac.jobs import run_job

    x = np.random.default_rng(0).standard_normal((30, 3))
    table = pa.table({"id": [f"e{i}" for i in range(30)], "label": np.arange(30) % 2, "x": list(x)})
    path = tmp_path / f"d.{kind}"
    if kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path, row_group_size=7)
    else:  # an Arrow IPC file of several record batches
        feather.write_feather(table, path, compression="uncompressed", chunksize=7)
    spec = JobSpec.from_dict({
        "model": {"factory": "distjac.models:mlp", "kwargs": {"sizes": [3, 5, 2]}},
        "data": {"kind": kind, "path": str(path), "column": "x"},
        "engine": {"num_workers": 0, "shard_size": 10, "progress": False},
        "output": {"path": str(tmp_path / "out"), "keep_columns": ["id", "label"]},
    })
    run_job(spec)
    import pyarrow.dataset as ds

    table = ds.dataset(str(tmp_path / "out"), format="arrow").to_table().sort_by("row")
    assert table.column("id").to_pylist() == [f"e{i}" for i in range(30)]
    assert table.column("label").to_pylist() == [i % 2 for i in range(30)]


def test_run_job_progress_lines_off_a_terminal(tmp_path, capfd, monkeypatch):
    from job_helpers import tiny_spec

    from distjac.jobs import run_job

    monkeypatch.setenv("DISTJAC_PROGRESS_INTERVAL", "0.01")
    run_job(tiny_spec(tmp_path / "out"), progress=True)
    err = capfd.readouterr().err
    assert "distjac: 50/50 rows (100%)" in err, err


# ------------------------------------------------------------------ item 2: progress within a shard

SLOW_MODEL_FILE = '''
import time

import torch
from torch import nn


class SlowBackward(nn.Module):
    """A linear map whose every reverse pass takes PAUSE seconds: a long shard."""

    PAUSE = 0.03

    def __init__(self, width=3, outputs=40):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(width, outputs)

    def forward(self, x):
        y = self.lin(x)
        if y.requires_grad:
            y.register_hook(lambda g: (time.sleep(self.PAUSE), g)[1])
        return y
'''


def _slow_job(tmp_path, workers: int):
    """One shard of 40 reverse passes (one per output, chunk_size 1) of ~0.03 s each."""
    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL_FILE)
    job = {
        "model": {"factory": "slowmodel.py:SlowBackward"},
        "data": {"kind": "synthetic", "rows": 64, "shape": [3], "seed": 0},
        "jacobian": {"mode": "rev", "chunk_size": 1},
        "engine": {"num_workers": workers, "shard_size": 64, "device": "cpu"},
        "output": {"path": str(tmp_path / "out")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def _rows_shown(stderr: str) -> list[int]:
    import re

    return [int(m.group(1).replace(",", "")) for m in re.finditer(r"^distjac: ([\d,]+)/64 rows", stderr, re.M)]


@pytest.mark.parametrize(("mode", "chunk", "block"), [("rev", 3, None), ("fwd", 2, None), ("rev", None, 16),
                                                      ("fwd", 1, 25)])
def test_kernel_reports_progress_within_a_call(mode, chunk, block):
    from distjac import kernels

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 9))
    x = torch.randn(100, 6, dtype=torch.float64)
    net = net.double()
    want = kernels.batch_jacobian(net, x, mode="rev")
    seen: list[float] = []
    s = kernels.Strategy(mode, chunk=chunk, block=block)
    with kernels.progress_to(seen.append):
        got = kernels.batch_jacobian(net, x, strategy=s)
    torch.testing.assert_close(got, want)
    passes = -(-(9 if mode == "rev" else 6) // (chunk or 100))
    blocks = -(-100 // (block or 100))
    assert len(seen) >= passes * blocks, seen
    assert all(a < b for a, b in zip(seen, seen[1:])), seen
    assert 0 < seen[0] < 1 and seen[-1] == 1.0


def test_kernel_progress_only_inside_progress_to_and_not_from_nested_calls():
    from distjac import kernels

    x = torch.randn(8, 4)
    seen: list[float] = []

    def outer(t):  # fn itself calls batch_jacobian: its passes are not the outer call's
        inner = kernels.batch_jacobian(torch.sin, t, mode="rev", parallel_iterations=1)
        return t * inner.sum(dim=(1, 2), keepdim=True).squeeze(-1)

    with kernels.progress_to(seen.append):
        kernels.batch_jacobian(outer, x, mode="rev", parallel_iterations=2)
    assert seen == [0.5, 1.0], seen
    kernels.batch_jacobian(torch.tanh, x, mode="rev", parallel_iterations=1)  # no block: nothing reported
    assert seen == [0.5, 1.0]


def test_progress_in_flight_rows_move_the_line():
    import io

    out = io.StringIO()
    p = Progress(100, 0, True, interval=3600, shards=2, file=out)
    p.set_in_flight(30.6)
    assert p.line().startswith("distjac: 30/100 rows (30%), ") and "ETA" in p.line()
    p.update(50, shards=1)  # the finished shard leaves the rows in flight
    assert p.shown == 50
    p.set_in_flight(49.9)
    assert p.shown == 99 and "done in" not in p.line()
    p.update(50, shards=1)
    p.set_in_flight(0)
    p.close()
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("distjac: 100/100 rows (100%)") and "done in" in last


def test_in_process_job_progress_moves_within_its_one_shard(tmp_path):
    config = _slow_job(tmp_path, workers=0)
    r = _cli("run", config, env={"DISTJAC_PROGRESS_INTERVAL": "0.1"})
    assert r.returncode == 0, r.stderr
    shown = _rows_shown(r.stderr)
    assert shown[-1] == 64, r.stderr
    assert any(0 < k < 64 for k in shown), r.stderr  # lines within the shard, not only at its end
    assert shown == sorted(shown), shown
    jac = distjac.read_result(str(tmp_path / "out"))
    assert jac.shape == (64, 40, 3)


@pytest.mark.ray
def test_ray_job_progress_moves_within_its_one_shard(tmp_path):
    """The worker answers the driver's progress polls in their own concurrency group while
    its shard runs."""
    config = _slow_job(tmp_path, workers=1)
    r = _cli("run", config, env={"DISTJAC_PROGRESS_INTERVAL": "0.1"})
    assert r.returncode == 0, r.stderr
    shown = _rows_shown(r.stderr)
    assert shown[-1] == 64, r.stderr
    assert any(0 < k < 64 for k in shown), r.stderr
    assert shown == sorted(shown), shown


def test_the_bar_moves_with_the_rows_in_flight():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with Progress(100, 0, None, shards=2, file=term) as p:
        assert p.mode == "bar"
        p.set_in_flight(30)
        assert p._bar.n == 30
        p.update(50, shards=1)
        assert p._bar.n == 50
        p.set_in_flight(20)
        assert p._bar.n == 70
        p.update(50, shards=1)
        assert p._bar.n == 100
    assert "100/100" in term.getvalue()
