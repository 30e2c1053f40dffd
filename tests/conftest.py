"""Test-suite settings: hypothesis draws the same examples on every run (CI is reproducible); the
scripts of experiments/ (not a package) are imported by file name."""

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("hcral", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile("hcral")

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="session")
def experiment_script():
    """``load(file name)`` -> the module of that script of experiments/."""

    @functools.cache  # one module per script and session, as an import would give
    def load(name: str):
        spec = importlib.util.spec_from_file_location(Path(name).stem, EXPERIMENTS / name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load
