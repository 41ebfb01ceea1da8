"""JobSpec: YAML, defaults, validation, overrides, the spec hash; and every bad input of a
job, each rejected before any work with a stable part of its message and nothing on disk."""

import glob
import os

import numpy as np
import pytest
import torch
from job_helpers import tiny_dict, tiny_spec, write_arrow, write_parquet

import distjac
from distjac.config import DataSpec, JobSpec, ModelSpec, build_model
from distjac.errors import (
    ConfigError,
    DtypeError,
    JobInputError,
    SourceDtypeError,
    SourceError,
    SourceNotFoundError,
)
from distjac.jobs import prepare_job, run_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------ loading


def _shipped_configs():
    return sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


@pytest.mark.parametrize("path", _shipped_configs())
def test_shipped_configs_are_valid(path):
    spec = JobSpec.from_yaml(path)
    assert spec.output.path.startswith("results/")
    assert spec.model.factory.startswith("distjac.models:")


def test_quickstart_is_the_readme_job():
    spec = distjac.JobSpec.from_yaml(os.path.join(ROOT, "configs", "quickstart.yaml"))
    assert spec.data.rows == 20000 and spec.output.path == "results/quickstart" and spec.output.format == "arrow"
    job = prepare_job(spec)  # checks the model against the data without running anything
    assert job.out_shape == (32,) and job.in_shape == (64,)


def test_defaults_and_round_trip(tmp_path):
    spec = tiny_spec(tmp_path / "out")
    assert spec.jacobian.dtype == "float32" and spec.engine.parallel_iterations == 8
    assert spec.engine.max_retries == 3 and spec.output.resume is True and spec.output.format == "arrow"
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_yaml_file(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "model: {factory: 'distjac.models:cube'}\n"
        "data: {kind: synthetic, rows: 1_000, shape: [4], seed: 3}\n"
        "jacobian: {reduce: frobenius}\n"
        "output: {path: out}\n"
    )
    spec = JobSpec.from_yaml(cfg, ["engine.num_workers=2", "data.shape=[2, 2]"])
    assert spec.data.rows == 1000 and spec.data.shape == (2, 2) and spec.jacobian.reduce == ("frobenius",)
    assert spec.engine.num_workers == 2


def test_missing_config_file(tmp_path):
    with pytest.raises(SourceNotFoundError, match="config file .*nope.yaml' does not exist"):
        JobSpec.from_yaml(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {factory: x\ndata: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML at line"):
        JobSpec.from_yaml(cfg)


def test_top_level_must_be_a_mapping(tmp_path):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        JobSpec.from_yaml(cfg)


# ------------------------------------------------------------------------ unknown keys


def test_unknown_section(tmp_path):
    d = tiny_dict(tmp_path)
    d["jacobain"] = {}
    with pytest.raises(ConfigError, match=r"unknown key 'jacobain' in the top level; valid keys are: model, data, "
                       r"jacobian, engine, output\. Did you mean jacobian\?"):
        JobSpec.from_dict(d)


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key jacobian\.'mod' in section 'jacobian'; valid keys are: "
                       r"mode, chunk_size, reduce, dtype, compute_dtype, estimate, structure\. "
                       r"Did you mean jacobian\.mode\?"):
        JobSpec.from_dict(tiny_dict(tmp_path, jacobian={"mod": "fwd"}))


def test_section_must_be_a_mapping(tmp_path):
    d = tiny_dict(tmp_path)
    d["engine"] = [1, 2]
    with pytest.raises(ConfigError, match="section 'engine' must be a mapping"):
        JobSpec.from_dict(d)


# ------------------------------------------------------------------------ bad values

BAD_VALUES = [
    ("jacobian", "mode", "fast", r"jacobian.mode='fast' is not valid; use one of 'rev', 'fwd', 'auto'"),
    ("jacobian", "dtype", "bfloat16", r"jacobian.dtype='bfloat16' is not valid; use one of 'float16', 'float32'"),
    ("jacobian", "compute_dtype", "int8", r"jacobian.compute_dtype='int8' is not valid; use one of"),
    ("jacobian", "chunk_size", 0, r"jacobian.chunk_size=0 is not valid; use null or an integer >= 1"),
    ("jacobian", "reduce", 3, r"jacobian.reduce=3 is not valid; use null or a list of frobenius"),
    ("engine", "shard_size", -5, r"engine.shard_size=-5 is not valid; use null or an integer >= 1"),
    ("engine", "max_in_flight", True, r"engine.max_in_flight=True is not valid; use an integer >= 1"),
    ("engine", "max_retries", "3", r"engine.max_retries='3' is not valid; use an integer >= 0"),
    ("engine", "device", "tpu", r"engine.device='tpu' is not valid; use one of 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("engine", "num_workers", -1, r"engine.num_workers=-1 is not valid"),
    ("engine", "progress", "yes please", r"engine.progress='yes please' is not valid; use true, false or null"),
    ("output", "format", "csv", r"output.format='csv' is not valid; use one of 'arrow', 'parquet'"),
    ("output", "resume", "maybe", r"output.resume='maybe' is not valid; use true or false"),
    ("output", "path", "", r"output.path='' is not valid; give a non-empty string"),
    ("data", "kind", "hdf5", r"data.kind='hdf5' is not valid; use one of 'synthetic', 'npy', 'parquet', 'arrow'"),
    ("data", "rows", -1, r"data.rows=-1 is not valid; use null or an integer >= 0"),
    ("data", "rows", 1.5, r"data.rows=1.5 is not valid"),
    ("data", "shape", [], r"data.shape=\[\] is not valid; give a non-empty list of integers >= 1"),
    ("data", "shape", [4, 0], r"data.shape=\[4, 0\] is not valid"),
    ("data", "dtype", "int32", r"data.dtype='int32' is not valid"),
    ("model", "factory", "distjac.models.mlp",
     r'model.factory=\'distjac.models.mlp\' is not valid; give "module:callable"'),
    ("model", "kwargs", [1], r"model.kwargs=\[1\] is not valid; give a mapping"),
]


@pytest.mark.parametrize("section,key,value,message", BAD_VALUES, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD_VALUES])
def test_bad_values(tmp_path, section, key, value, message):
    with pytest.raises(ConfigError, match=message):
        JobSpec.from_dict(tiny_dict(tmp_path, **{section: {key: value}}))


def test_unknown_reduction(tmp_path):
    with pytest.raises(ConfigError, match=r"jacobian.reduce: unknown reduction 'nuclear'; use null or a list of "
                       r"'frobenius', 'spectral', 'trace', 'logabsdet'"):
        JobSpec.from_dict(tiny_dict(tmp_path, jacobian={"reduce": ["frobenius", "nuclear"]}))


def test_duplicate_reduction(tmp_path):
    with pytest.raises(ConfigError, match="jacobian.reduce lists trace more than once"):
        JobSpec.from_dict(tiny_dict(tmp_path, jacobian={"reduce": ["trace", "frobenius", "trace"]}))


@pytest.mark.parametrize("section,values,message", [
    ("model", {"factory": None}, "model.factory is required"),
    ("output", {"path": None}, "output.path is required"),
    ("data", {"rows": None}, "data.rows is required for data.kind 'synthetic'"),
    ("data", {"shape": None}, "data.shape is required for data.kind 'synthetic'"),
    ("data", {"kind": "npy", "shape": None}, r"data.path is required for data.kind 'npy'"),
])
def test_missing_required(tmp_path, section, values, message):
    with pytest.raises(ConfigError, match=message):
        JobSpec.from_dict(tiny_dict(tmp_path, **{section: values}))


@pytest.mark.parametrize("sections,message", [
    ({"data": {"path": "x.npy"}}, "data.path conflicts with data.kind 'synthetic'"),
    ({"data": {"kind": "npy", "path": "x.npy", "shape": None, "column": "x"}},
     "data.column conflicts with data.kind 'npy'"),
    ({"data": {"kind": "npy", "path": "x.npy"}}, "data.shape is only for data.kind 'synthetic'"),
    ({"data": {"kind": "parquet", "path": "x.parquet", "shape": None, "seed": 4}}, "data.seed is only for data.kind"),
    ({"data": {"kind": "tensor", "shape": None}}, "data.kind 'tensor' needs data.tensor"),
    ({"engine": {"num_workers": 0, "address": "auto"}},
     "engine.num_workers=0 runs the job in this process without Ray"),
])
def test_conflicting_settings(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        JobSpec.from_dict(tiny_dict(tmp_path, **sections))


def test_errors_are_value_errors_and_job_input_errors(tmp_path):
    with pytest.raises(ValueError) as info:
        JobSpec.from_dict(tiny_dict(tmp_path, jacobian={"mode": "x"}))
    assert isinstance(info.value, JobInputError) and isinstance(info.value, distjac.DistjacError)


# ------------------------------------------------------------------------ overrides


def test_overrides_parse_yaml_scalars(tmp_path):
    spec = tiny_spec(tmp_path).with_overrides([
        "jacobian.mode=fwd", "engine.shard_size=7", "jacobian.reduce=[frobenius, spectral]",
        "engine.address=", "output.resume=false", "model.kwargs.sizes=[3, 4, 2]", "model.kwargs.activation=relu",
    ])
    assert spec.jacobian.mode == "fwd" and spec.engine.shard_size == 7
    assert spec.jacobian.reduce == ("frobenius", "spectral") and spec.engine.address is None
    assert spec.output.resume is False and spec.model.kwargs == {"sizes": [3, 4, 2], "activation": "relu"}


def test_override_of_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key engine.'workers' in section 'engine'; valid keys are: address"):
        tiny_spec(tmp_path).with_overrides(["engine.workers=2"])


@pytest.mark.parametrize("item,message", [
    ("jacobian.mode", "--set expects key.path=value"),
    ("mode=fwd", "--set 'mode=fwd': name a key inside a section"),
    ("jacobian.mode.x=1", r"jacobian.mode is not a section or mapping"),
])
def test_malformed_overrides(tmp_path, item, message):
    with pytest.raises(ConfigError, match=message):
        tiny_spec(tmp_path).with_overrides([item])


def test_override_values_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"engine.max_in_flight=0 is not valid"):
        tiny_spec(tmp_path).with_overrides(["engine.max_in_flight=0"])


# ------------------------------------------------------------------------ the spec hash


def test_spec_hash_ignores_how_and_where(tmp_path):
    base = tiny_spec(tmp_path / "a")
    same = base.with_overrides([
        f"output.path={tmp_path / 'b'}", "output.resume=false", "output.overwrite=true", "engine.num_workers=3",
        "engine.shard_size=5", "engine.max_in_flight=2", "engine.max_retries=0", "engine.progress=true",
        "engine.device=cpu", "jacobian.chunk_size=2",
    ])
    assert same.spec_hash() == base.spec_hash()
    reordered = JobSpec.from_dict(dict(reversed(list(base.to_dict().items()))))
    assert reordered.spec_hash() == base.spec_hash()


@pytest.mark.parametrize("item", [
    "data.seed=1", "data.rows=51", "data.shape=[4]", "data.dtype=float64", "model.kwargs.seed=1",
    "model.kwargs.sizes=[3, 6, 2]", "model.factory=distjac.models:cube", "jacobian.mode=fwd",
    "jacobian.reduce=[frobenius]", "jacobian.dtype=float64", "jacobian.compute_dtype=float64", "output.format=parquet",
])
def test_spec_hash_covers_the_results(tmp_path, item):
    base = tiny_spec(tmp_path)
    assert base.with_overrides([item]).spec_hash() != base.spec_hash()


def test_spec_hash_of_in_memory_tensor(tmp_path):
    x = torch.arange(12.0).reshape(4, 3)

    def spec(t):
        return JobSpec.from_dict(tiny_dict(tmp_path, data={"kind": "tensor", "tensor": t, "rows": None, "shape": None}))

    assert spec(x).spec_hash() == spec(x.clone()).spec_hash() != spec(x + 1).spec_hash()


# ------------------------------------------------------------------------ the model factory


def test_build_model_with_weights(tmp_path):
    spec = ModelSpec("distjac.models:mlp", {"sizes": [3, 4, 2], "seed": 1})
    trained = build_model(spec)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    other = build_model(ModelSpec("distjac.models:mlp", {"sizes": [3, 4, 2], "seed": 2}, str(tmp_path / "w.pt")))
    x = torch.randn(5, 3)
    torch.testing.assert_close(other(x), trained(x))
    assert not any(p.requires_grad for p in other.parameters()) and not other.training


@pytest.mark.parametrize("spec,error,message", [
    (ModelSpec("no_such_module_xyz:f"), ConfigError, "cannot import module 'no_such_module_xyz'"),
    (ModelSpec("distjac.models:mpl"), ConfigError, "'distjac.models' has no attribute 'mpl'; callables there: .*mlp"),
    (ModelSpec("distjac.models:mlp", {"size": [3, 2]}), ConfigError, "rejected model.kwargs"),
    (ModelSpec("distjac.models:mlp", {"sizes": [3]}), ConfigError, "failed: mlp\\(sizes="),
    (ModelSpec("job_helpers:not_a_model"), ConfigError, "returned a int, not a callable model"),
    (ModelSpec("distjac.models:cube", {}, "/no/such/weights.pt"), SourceNotFoundError,
     "model.weights=.*does not exist"),
])
def test_bad_models(spec, error, message):
    with pytest.raises(error, match=message):
        build_model(spec)


def test_weights_that_do_not_fit(tmp_path):
    torch.save(build_model(ModelSpec("distjac.models:mlp", {"sizes": [3, 4, 2]})).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="do not fit the model"):
        build_model(ModelSpec("distjac.models:mlp", {"sizes": [3, 5, 2]}, str(tmp_path / "w.pt")))


# ------------------------------------------------------------------------ bad inputs leave nothing on disk


def _fails_cleanly(spec, error, message):
    out = spec.output.path
    with pytest.raises(error, match=message):
        run_job(spec)
    assert not os.path.exists(out), f"a failed check left {os.listdir(out)}"


def _file_spec(tmp_path, kind, path, column=None, **jacobian):
    return tiny_spec(tmp_path / "out", data={"kind": kind, "path": str(path), "column": column, "rows": None,
                                             "shape": None}, jacobian=jacobian)


def test_missing_input_file(tmp_path):
    _fails_cleanly(_file_spec(tmp_path, "npy", tmp_path / "nope.npy"), SourceNotFoundError,
                   r"data: input file .*nope.npy' does not exist")
    assert issubclass(SourceNotFoundError, FileNotFoundError)


def test_empty_input_directory(tmp_path):
    (tmp_path / "in").mkdir()
    _fails_cleanly(_file_spec(tmp_path, "parquet", tmp_path / "in"), SourceNotFoundError, "holds no parquet files")


def test_wrong_column_lists_the_columns(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", np.zeros((4, 3), np.float32))
    _fails_cleanly(_file_spec(tmp_path, "parquet", path, "features"), SourceError,
                   r"has no column 'features'; its columns are: id \(int64\), x \(fixed_shape_tensor\)")


def test_non_tensor_column(tmp_path):
    path = write_arrow(tmp_path / "in.arrow", np.zeros((4, 3), np.float32), extra={"label": pa_strings(4)})
    _fails_cleanly(_file_spec(tmp_path, "arrow", path, "label"), SourceError,
                   r"column 'label' of .* has type string, not a tensor; distjac reads arrow.fixed_shape_tensor")


def test_wrong_dtype_column(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", np.zeros((4, 3), np.int64))
    _fails_cleanly(_file_spec(tmp_path, "parquet", path, "x"), SourceDtypeError,
                   r"column 'x' of .* holds int64 values; distjac differentiates floating values only")
    assert issubclass(SourceDtypeError, DtypeError) and issubclass(SourceDtypeError, TypeError)


def test_wrong_dtype_npy(tmp_path):
    np.save(tmp_path / "in.npy", np.zeros((4, 3), np.int32))
    _fails_cleanly(_file_spec(tmp_path, "npy", tmp_path / "in.npy"), SourceDtypeError, r"holds int32 values")


def test_reduction_on_non_square_jacobian(tmp_path):
    spec = tiny_spec(tmp_path / "out", jacobian={"reduce": ["frobenius", "logabsdet"]})
    _fails_cleanly(spec, ConfigError, r"'logabsdet' needs a square per-example Jacobian, but it is 2 x 3 "
                   r"\(output \(2,\), input \(3,\)\)")


def test_model_that_does_not_fit_the_data(tmp_path):
    spec = tiny_spec(tmp_path / "out", data={"shape": [4]})
    _fails_cleanly(spec, ConfigError, r"model.factory='distjac.models:mlp' fails on a batch of shape \(2, 4\)")


def test_more_rows_than_the_file_has(tmp_path):
    np.save(tmp_path / "in.npy", np.zeros((4, 3), np.float32))
    spec = tiny_spec(tmp_path / "out",
                     data={"kind": "npy", "path": str(tmp_path / "in.npy"), "rows": 10, "shape": None})
    _fails_cleanly(spec, SourceError, r"data.rows=10 but .* has only 4 rows")


def test_in_memory_tensor_of_ints(tmp_path):
    ints = torch.zeros(4, 3, dtype=torch.long)
    spec = JobSpec.from_dict(tiny_dict(tmp_path / "out", data={"kind": "tensor", "tensor": ints, "rows": None,
                                                                "shape": None}))
    _fails_cleanly(spec, SourceDtypeError, "data.tensor has dtype torch.int64")


def pa_strings(n):
    import pyarrow as pa

    return pa.array([f"s{i}" for i in range(n)])


def test_dataspec_is_frozen():
    with pytest.raises(AttributeError):
        DataSpec().rows = 3
