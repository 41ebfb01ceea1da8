"""Ray's private APIs that distjac relies on, one function each, with a fallback.

Each was read from and tested with Ray 2.60; where the private name is gone in another
version, the fallback does what Ray 2.60 does (or the least surprising thing).
"""

from __future__ import annotations

import os

__all__ = ["ray_address_file", "running_gcs_addresses"]


def ray_address_file() -> str:
    """The file where ``ray start`` records the latest local cluster's GCS address.

    Ray 2.60: ``ray._common.utils.get_ray_address_file(None)``, i.e.
    ``$RAY_TMPDIR/ray/ray_current_cluster`` (else ``$TMPDIR``, else ``/tmp``).
    """
    try:
        from ray._common.utils import get_ray_address_file

        return get_ray_address_file(None)
    except Exception:  # pragma: no cover - another Ray version
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return os.path.join(base, "ray", "ray_current_cluster")


def running_gcs_addresses() -> list[str]:
    """GCS addresses of Ray clusters running on this machine, found from the process
    table (Ray 2.60: ``ray._private.services.find_gcs_addresses``, what "auto" falls back
    to when no address file exists); [] where that is unavailable."""
    try:
        from ray._private import services

        return sorted(services.find_gcs_addresses())
    except Exception:  # pragma: no cover - another Ray version
        return []
