"""Test-suite settings: hypothesis draws the same examples on every run (CI is reproducible)."""

from hypothesis import settings

settings.register_profile("hcral", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile("hcral")
