"""Shared pytest setup for distjac's tests.

pytest runs with ``--import-mode=importlib`` (see pyproject.toml), which does not put the
tests folder on ``sys.path``; test modules import their shared comparison helpers with
``from helpers import ...``, so the folder is added here, once, before collection.
"""

import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# distjac's on-disk caches (the tuning cache, Inductor's artifacts) go to a folder of this
# session, not the user's ~/.cache, and the tuning cache is off unless a test turns it on
# (tests/test_tuning.py): a choice stored by one test must not decide another's record.
if "DISTJAC_CACHE_DIR" not in os.environ:
    import atexit
    import functools
    import shutil
    import tempfile

    os.environ["DISTJAC_CACHE_DIR"] = tempfile.mkdtemp(prefix="distjac-test-cache-")
    # removed when the session ends (subprocesses that inherit it have ended by then)
    atexit.register(functools.partial(shutil.rmtree, os.environ["DISTJAC_CACHE_DIR"], ignore_errors=True))
os.environ.setdefault("DISTJAC_TUNING_CACHE", "0")
