"""Issue 9, items 11-13: bad input is refused before anything is written.

* 11: YAML alias bombs (billion laughs) are refused while the config is parsed, before
  anything expands them.
* 12: what can be checked before the first shard is (model output dtype, shape and rank
  on a probe; weights; nulls in Parquet/Arrow columns; that a CUDA device exists), with
  exit status 2, one line on stderr, and nothing written.
* 13: a config is code: ``distjac plan`` does not import or call the factory unless
  ``--probe``; factories that are not Python functions or nn.Module classes (``os:system``)
  are refused before anything is called.

What the user sees (exit status, stderr, files) is checked through a real ``distjac``
subprocess; the rest calls the API in this process.
"""

import functools
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from job_helpers import TESTS_DIR, tiny_dict, write_arrow, write_parquet

from distjac.config import JobSpec, ModelSpec, build_model, resolve_factory
from distjac.errors import ConfigError, SourceError
from distjac.io.sources import open_source
from distjac.jobs import prepare_job, run_job

# A module of user models, written into each test's folder and put on the CLI's path.
USER_MODELS = '''
import functools
import os
import subprocess

import torch
from torch import nn
from distjac.models import mlp

MARKER = os.environ.get("DISTJAC_TEST_MARKER")
if os.environ.get("DISTJAC_TEST_IMPORT_MARKER"):
    open(os.environ["DISTJAC_TEST_IMPORT_MARKER"], "w").close()   # importing this runs code


class IntOut(nn.Module):
    def forward(self, x):
        return (x > 0).long()


class TupleOut(nn.Module):
    def forward(self, x):
        return x * 2, x


def int_model():
    return IntOut()


def tuple_model():
    return TupleOut()


def bool_fn():
    return lambda x: x > 0


def cube_fn():
    """A factory returning a plain function of a tensor."""
    return lambda x: x * x * x


def marks_when_called(sizes=(3, 5, 2)):
    open(MARKER, "w").close()
    return mlp(list(sizes))


def returns_a_class():
    return IntOut


class Builder:
    """A class that is not an nn.Module (calling it builds something else)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


class Net(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.lin = nn.Linear(n, 2)

    def forward(self, x):
        return self.lin(x)

    @classmethod
    def make(cls, n=3):
        return cls(n)


instance = Net()
partial_mlp = functools.partial(mlp, sizes=[3, 5, 2])
run_shell = subprocess.run          # a standard-library function re-exported
system = os.system                  # a builtin re-exported
'''


@pytest.fixture
def user(tmp_path, monkeypatch):
    """``usermodels`` importable here and in CLI subprocesses; returns the env for those."""
    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DISTJAC_TEST_MARKER", str(tmp_path / "called"))
    sys.modules.pop("usermodels", None)
    yield {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    sys.modules.pop("usermodels", None)


def _config(tmp_path, text=None, **sections):
    path = tmp_path / "job.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(tiny_dict(tmp_path / "out", **sections)))
    return str(path)


def _cli(*args, env=None):
    env = env or {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "distjac.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _refused(r, message, out=None):
    """Exit 2, one line on stderr that matches ``message``, no traceback, nothing written."""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0], lines[0]
    if out is not None:
        assert not os.path.exists(out), f"the refused job wrote {os.listdir(out)}"
    return lines[0]


# ------------------------------------------------------------------------ 11: YAML aliases

BILLION_LAUGHS = """\
model:
  factory: "distjac.models:mlp"
  kwargs:
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
data: {kind: synthetic, rows: 4, shape: [3]}
output: {path: OUT}
"""


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    cfg = _config(tmp_path, BILLION_LAUGHS.replace("OUT", str(tmp_path / "out")))
    assert os.path.getsize(cfg) < 800
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"aliases .*expand to more than 100,000 values"):
            JobSpec.from_yaml(cfg).spec_hash()
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < 1.0 and peak < 20 * 2**20, (seconds, peak)


def test_yaml_alias_bomb_exits_2_under_plan_and_run(tmp_path):
    cfg = _config(tmp_path, BILLION_LAUGHS.replace("OUT", str(tmp_path / "out")))
    for command in ("plan", "run"):
        t0 = time.perf_counter()
        line = _refused(_cli(command, cfg, "--workers", "0"), "aliases", tmp_path / "out")
        assert time.perf_counter() - t0 < 60 and "job.yaml" in line


def test_many_aliases_are_refused_even_when_small(tmp_path):
    items = ", ".join(["*x"] * 101)
    cfg = _config(tmp_path, f"model: {{factory: 'distjac.models:cube', kwargs: {{x: &x 1, y: [{items}]}}}}\n")
    with pytest.raises(ConfigError, match="101 aliases; at most 100"):
        JobSpec.from_yaml(cfg)


def test_recursive_alias_is_refused(tmp_path):
    cfg = _config(tmp_path, "model: {factory: 'distjac.models:cube', kwargs: {x: &x [1, *x]}}\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        JobSpec.from_yaml(cfg)


def test_a_config_with_a_few_aliases_still_loads(tmp_path):
    text = textwrap.dedent(f"""\
        defaults: &sizes [3, 5, 2]
        model: {{factory: "distjac.models:mlp", kwargs: {{sizes: *sizes}}}}
        data: {{kind: synthetic, rows: 4, shape: [3]}}
        engine: &eng {{num_workers: 0, progress: false}}
        output: {{path: {tmp_path / 'out'}}}
        """)
    # a top-level "defaults" key is not a section: the aliases resolve, then the key is refused
    with pytest.raises(ConfigError, match="unknown key 'defaults'"):
        JobSpec.from_yaml(_config(tmp_path, text))
    text = text.replace("defaults: &sizes [3, 5, 2]\n", "").replace("sizes: *sizes", "sizes: &s [3, 5, 2], x: *s")
    text = text.replace("engine: &eng", "engine:")
    spec = JobSpec.from_yaml(_config(tmp_path, text))
    assert spec.model.kwargs["x"] == [3, 5, 2] and spec.engine.num_workers == 0


def test_merge_keys_still_work(tmp_path):
    text = textwrap.dedent(f"""\
        model:
          factory: "distjac.models:mlp"
          kwargs:
            base: &base {{activation: tanh, seed: 1}}
            other: {{<<: *base, seed: 2}}
        data: {{kind: synthetic, rows: 4, shape: [3]}}
        output: {{path: {tmp_path / 'out'}}}
        """)
    spec = JobSpec.from_yaml(_config(tmp_path, text))
    assert spec.model.kwargs["other"] == {"activation": "tanh", "seed": 2}


# ------------------------------------------------------------------------ 12: the model's output


def test_int_output_exits_2_before_anything_is_written(tmp_path, user):
    cfg = _config(tmp_path, model={"factory": "usermodels:int_model", "kwargs": {}})
    line = _refused(_cli("run", cfg, "--workers", "0", env=user), "returns int64 values", tmp_path / "out")
    assert "floating" in line


@pytest.mark.parametrize("factory,message", [
    ("usermodels:bool_fn", "returns bool values"),
    ("usermodels:tuple_model", "returns a tuple"),
])
def test_outputs_that_have_no_jacobian_are_refused(tmp_path, user, factory, message):
    spec = JobSpec.from_dict(tiny_dict(tmp_path / "out", model={"factory": factory, "kwargs": {}}))
    with pytest.raises(ConfigError, match=message):
        prepare_job(spec)
    assert not os.path.exists(tmp_path / "out")


def test_factory_returning_a_plain_function_works(tmp_path, user):
    spec = JobSpec.from_dict(tiny_dict(tmp_path / "out", model={"factory": "usermodels:cube_fn", "kwargs": {}}))
    assert prepare_job(spec).out_shape == (3,)


# ------------------------------------------------------------------------ 12: weights


def _mlp():
    return build_model(ModelSpec("distjac.models:mlp", {"sizes": [3, 5, 2], "seed": 7}))


def test_pickled_whole_model_exits_2_and_says_save_the_state_dict(tmp_path):
    torch.save(_mlp(), tmp_path / "whole.pt")
    cfg = _config(tmp_path, model={"weights": str(tmp_path / "whole.pt")})
    line = _refused(_cli("run", cfg, "--workers", "0"), "model.weights=", tmp_path / "out")
    assert "weights_only" in line and "model.state_dict()" in line


def test_checkpoint_dict_needs_weights_key(tmp_path):
    trained = _mlp()
    torch.save({"model": trained.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    base = {"factory": "distjac.models:mlp", "kwargs": {"sizes": [3, 5, 2]}, "weights": str(tmp_path / "ckpt.pt")}
    with pytest.raises(ConfigError, match=r"a checkpoint with keys 'model', 'epoch'.*model.weights_key: model"):
        build_model(ModelSpec(**base))
    model = build_model(ModelSpec(**base, weights_key="model"))
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x), trained(x))
    with pytest.raises(ConfigError, match=r"model.weights_key='optimizer'.*keys are: 'model', 'epoch'"):
        build_model(ModelSpec(**base, weights_key="optimizer"))
    with pytest.raises(ConfigError, match=r"model.weights_key='epoch'.*not a state dict"):
        build_model(ModelSpec(**base, weights_key="epoch"))


def test_weights_key_is_validated_and_hashed(tmp_path):
    d = tiny_dict(tmp_path / "out", model={"weights": "w.pt"})
    assert JobSpec.from_dict(d).spec_hash() != JobSpec.from_dict(
        tiny_dict(tmp_path / "out", model={"weights": "w.pt", "weights_key": "model"})).spec_hash()
    with pytest.raises(ConfigError, match="model.weights_key needs model.weights"):
        JobSpec.from_dict(tiny_dict(tmp_path / "out", model={"weights_key": "model"}))
    with pytest.raises(ConfigError, match="model.weights_key=3 is not valid"):
        JobSpec.from_dict(tiny_dict(tmp_path / "out", model={"weights": "w.pt", "weights_key": 3}))


def test_state_dict_keys_that_do_not_match_are_named(tmp_path):
    state = {f"module.{k}": v for k, v in _mlp().state_dict().items()}
    torch.save(state, tmp_path / "ddp.pt")
    spec = ModelSpec("distjac.models:mlp", {"sizes": [3, 5, 2]}, str(tmp_path / "ddp.pt"))
    with pytest.raises(ConfigError, match=r"missing keys '0.weight', .*unexpected keys 'module.0.weight'.*"
                                          r"prefix 'module.'"):
        build_model(spec)


def test_weights_that_are_not_a_torch_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"model.weights=.*junk.pt' cannot be read by torch.load"):
        build_model(ModelSpec("distjac.models:mlp", {"sizes": [3, 5, 2]}, str(tmp_path / "junk.pt")))


# ------------------------------------------------------------------------ 12: nulls in the input


def _values(n=20):
    return np.random.default_rng(0).standard_normal((n, 3)).astype(np.float32)


def _with_null_row(values, row):
    rows = [None if i == row else list(map(float, v)) for i, v in enumerate(values)]
    return pa.array(rows, type=pa.list_(pa.float32(), 3))


def _with_null_element(values, row):
    flat = [float(v) for v in values.reshape(-1)]
    flat[row * 3 + 1] = None
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), 3)


def _data(kind, path):
    return {"kind": kind, "path": str(path), "rows": None, "shape": None}


def test_parquet_null_row_exits_2_naming_the_row(tmp_path):
    pq.write_table(pa.table({"x": _with_null_row(_values(), 13)}), tmp_path / "in.parquet", row_group_size=8)
    cfg = _config(tmp_path, data=_data("parquet", tmp_path / "in.parquet"))
    line = _refused(_cli("run", cfg, "--workers", "0"), "null", tmp_path / "out")
    assert "row 13" in line


# Arrow IPC files always record null counts; Parquet files may be written without statistics.
@pytest.mark.parametrize("kind,statistics", [("parquet", True), ("parquet", False), ("arrow", True)])
@pytest.mark.parametrize("where", ["row", "element"])
def test_nulls_are_refused_when_the_source_is_opened(tmp_path, kind, where, statistics):
    values = _values()
    col = _with_null_row(values, 13) if where == "row" else _with_null_element(values, 13)
    path = tmp_path / f"in.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table({"x": col}), path, row_group_size=8, write_statistics=statistics)
    else:
        import pyarrow.ipc as ipc

        table = pa.table({"x": col})
        with ipc.new_file(str(path), table.schema) as w:
            for batch in table.to_batches(max_chunksize=8):
                w.write_batch(batch)
    spec = JobSpec.from_dict(tiny_dict(tmp_path / "out", data=_data(kind, path)))
    what = "a null row" if where == "row" else "a null value"
    with pytest.raises(SourceError, match=rf"column 'x' of .*in.{kind}' has {what} at row 13"):
        run_job(spec)
    assert not os.path.exists(tmp_path / "out")


def test_nulls_past_data_rows_are_not_read(tmp_path):
    pq.write_table(pa.table({"x": _with_null_row(_values(), 17)}), tmp_path / "in.parquet", row_group_size=8)
    src = open_source(JobSpec.from_dict(tiny_dict(tmp_path / "out", data={
        **_data("parquet", tmp_path / "in.parquet"), "rows": 16})).data)
    assert src.read(0, 16).shape == (16, 3)


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_the_read_path_refuses_nulls_too(tmp_path, kind):
    """A file changed after the job checked it: the shard's read names the row."""
    path = tmp_path / f"in.{kind}"
    write = write_parquet if kind == "parquet" else write_arrow
    write(path, _values(), as_list=True)
    src = open_source(JobSpec.from_dict(tiny_dict(tmp_path / "out", data=_data(kind, path))).data)
    time.sleep(0.01)
    table = pa.table({"id": pa.array(np.arange(20)), "x": _with_null_element(_values(), 5)})
    if kind == "parquet":
        pq.write_table(table, path)
    else:
        import pyarrow.ipc as ipc

        with ipc.new_file(str(path), table.schema) as w:
            w.write_table(table)
    with pytest.raises(SourceError, match=r"has a null value at row 5"):
        src.read(0, 10)


# ------------------------------------------------------------------------ 12: the device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_cuda_exits_2(tmp_path):
    cfg = _config(tmp_path, engine={"device": "cuda"})
    line = _refused(_cli("run", cfg, "--workers", "0"), "engine.device='cuda'", tmp_path / "out")
    assert "no CUDA device" in line and "'cpu'" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_checked_where_the_workers_run(tmp_path):
    spec = JobSpec.from_dict(tiny_dict(tmp_path / "out", engine={"device": "cuda:1", "num_workers": None}))
    prepare_job(spec)  # workers elsewhere (a cluster): not this machine's business
    with pytest.raises(ConfigError, match=r"engine.device='cuda:1'.*no CUDA device"):
        prepare_job(spec, device_here=True)


# ------------------------------------------------------------------------ 13: a config is code


def _pwned_config(tmp_path, factory="os:system"):
    pwned = tmp_path / "pwned"
    return _config(tmp_path, model={"factory": factory, "kwargs": {"command": f"touch {pwned}"}}), pwned


@pytest.mark.parametrize("args", [("plan",), ("plan", "--probe"), ("run", "--workers", "0")])
def test_os_system_never_runs(tmp_path, args):
    cfg, pwned = _pwned_config(tmp_path)
    line = _refused(_cli(args[0], cfg, *args[1:]), "model.factory='os:system'", tmp_path / "out")
    assert "standard library" in line
    assert not pwned.exists()


@pytest.mark.parametrize("factory,message", [
    ("subprocess:run", "standard library"),
    ("usermodels:run_shell", "defined in 'subprocess', the Python standard library"),
    ("usermodels:system", "not a Python function"),
    ("torch:zeros", "not a Python function"),
    ("usermodels:Builder", "the class 'Builder', which is not a torch.nn.Module"),
    ("usermodels:instance", "a Net instance"),
])
def test_factories_that_are_not_model_builders_are_refused_before_a_call(tmp_path, user, factory, message):
    with pytest.raises(ConfigError, match=message):
        resolve_factory(factory)
    with pytest.raises(ConfigError, match=message):  # spec validation refuses a stdlib module by name
        run_job(JobSpec.from_dict(tiny_dict(tmp_path / "out", model={"factory": factory, "kwargs": {}})))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("factory,kwargs", [
    ("usermodels:partial_mlp", {}),
    ("usermodels:Net", {"n": 3}),
    ("usermodels:Net.make", {"n": 3}),
    ("torch.nn:Identity", {}),
    ("usermodels:cube_fn", {}),
])
def test_factories_that_build_models_are_accepted(tmp_path, user, factory, kwargs):
    spec = JobSpec.from_dict(tiny_dict(tmp_path / "out", model={"factory": factory, "kwargs": kwargs}))
    assert prepare_job(spec).out_shape in ((2,), (3,))


def test_factory_returning_a_class_is_refused(tmp_path, user):
    with pytest.raises(ConfigError, match="returned the class 'IntOut'.*an instance"):
        build_model(ModelSpec("usermodels:returns_a_class"))


def test_plan_imports_and_calls_nothing_unless_probe(tmp_path, user):
    user = {**user, "DISTJAC_TEST_IMPORT_MARKER": str(tmp_path / "imported")}
    cfg = _config(tmp_path, model={"factory": "usermodels:marks_when_called", "kwargs": {}})
    r = _cli("plan", cfg, env=user)
    assert r.returncode == 0, r.stderr
    assert "not built" in r.stdout and "--probe" in r.stdout
    assert not (tmp_path / "imported").exists() and not (tmp_path / "called").exists()
    r = _cli("plan", cfg, "--probe", env=user)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "imported").exists() and (tmp_path / "called").exists()
    assert "ShardPlan" in r.stdout and not os.path.exists(tmp_path / "out")


def test_plan_without_probe_still_checks_the_module_exists_and_the_data(tmp_path, user):
    cfg = _config(tmp_path, model={"factory": "usermodelz:mlp", "kwargs": {}})
    _refused(_cli("plan", cfg, env=user), "cannot import module 'usermodelz'")
    cfg = _config(tmp_path, data=_data("npy", tmp_path / "nope.npy"))
    _refused(_cli("plan", cfg, env=user), "does not exist")


def test_help_says_a_config_is_code():
    for command in ("run", "plan"):
        r = _cli(command, "--help")
        assert r.returncode == 0
        text = " ".join(r.stdout.split())
        assert "trust" in text and "like a script" in text, text
    docs = open(os.path.join(TESTS_DIR, "..", "docs", "jobs.md")).read()
    assert "trust a config like a script" in " ".join(docs.split())


def test_partial_of_a_builtin_is_refused(user):
    import usermodels

    usermodels.bad_partial = functools.partial(os.system, "true")
    with pytest.raises(ConfigError, match="not a Python function"):
        resolve_factory("usermodels:bad_partial")
