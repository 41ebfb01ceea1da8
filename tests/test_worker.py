"""JacobianWorker used directly, outside Ray: it must not start Ray (issue 10, item 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent("""
    import json, sys
    import psutil, torch
    from distjac import arrow
    from distjac.shard import KernelOptions, ShardTask
    from distjac.worker import JacobianWorker, serialize_function

    w = JacobianWorker("cpu", num_threads=1)
    fn = serialize_function(lambda t: t * t)
    task = ShardTask(0, 0, 3, dtype="float32", rows=torch.ones(3, 2).numpy(), options=KernelOptions(mode="rev"))
    batch = w.run("k", [fn], task).batch
    ray = sys.modules.get("ray")
    names = [p.name() for p in psutil.Process().children(recursive=True)]
    print(json.dumps({"rows": batch.num_rows, "info": w.info(), "ray_imported": ray is not None,
                      "ray_initialized": bool(ray is not None and ray.is_initialized()),
                      "children": names}))
""")


def test_worker_outside_ray_starts_no_ray():
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # nothing to join either
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["rows"] == 3 and got["info"]["device"] == "cpu"
    assert not got["ray_initialized"]
    assert not got["ray_imported"], "the worker imported Ray outside Ray"
    assert not [n for n in got["children"] if "raylet" in n or "gcs" in n], got["children"]
