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
