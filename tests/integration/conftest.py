"""Fixtures every integration test may use by name."""

from tests.support.migration import pair

__all__ = ["pair"]
