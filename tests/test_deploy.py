"""Cluster scripts and container files: what can be checked without Docker or a cluster
(files referenced exist, shell syntax, versions agree with pyproject and constraints)."""

import os
import re
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["scripts/ray_head.sh", "scripts/ray_worker.sh", "scripts/submit_job.sh"]


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _pins():
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", _read("constraints.txt"), re.M))


@pytest.mark.parametrize("rel", SCRIPTS)
def test_scripts_are_executable_bash(rel):
    path = os.path.join(ROOT, rel)
    assert os.access(path, os.X_OK), f"{rel} is not executable"
    subprocess.run(["bash", "-n", path], check=True)
    text = _read(rel)
    assert "RAY_AUTH_MODE=token" in text  # every node and driver authenticates


def test_dockerfile_matches_the_tested_versions():
    text = _read("docker/Dockerfile")
    ray = re.search(r"^ARG RAY_VERSION=(\S+)", text, re.M).group(1)
    py = re.search(r"^ARG PYTHON_TAG=py(\d)(\d+)", text, re.M)
    assert ray == _pins()["ray"], "the image's Ray must be the version the tests pin"
    required = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+)"', _read("pyproject.toml"))
    assert (int(py.group(1)), int(py.group(2))) >= (int(required.group(1)), int(required.group(2)))
    assert (int(py.group(1)), int(py.group(2))) == sys.version_info[:2], "the image's Python is the tests' Python"
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for name in src.split():
            if not name.endswith("*"):
                assert os.path.exists(os.path.join(ROOT, name)), f"Dockerfile copies {name}, which does not exist"


def test_compose_file():
    compose = yaml.safe_load(_read("docker/compose.yaml"))
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    assert head["build"]["dockerfile"] == "docker/Dockerfile"
    assert os.path.exists(os.path.join(ROOT, "docker", head["build"]["context"], head["build"]["dockerfile"]))
    assert "--head" in head["command"] and "ray-head:6379" in worker["command"]
    assert head["image"] == worker["image"] == "distjac:0.1.0"
    assert all(p.startswith("127.0.0.1:") for p in head["ports"])  # the dashboard stays on loopback
    assert worker["environment"]["RAY_AUTH_MODE"] == "token"


def test_documented_files_exist():
    text = _read("docs/jobs.md")
    for rel in set(re.findall(r"\b((?:configs|scripts|docker)/[\w./-]+\.(?:yaml|sh|py)|docker/Dockerfile)\b", text)):
        assert os.path.exists(os.path.join(ROOT, rel)), f"docs/jobs.md names {rel}, which does not exist"
