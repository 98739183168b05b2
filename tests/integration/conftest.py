"""Fixtures every integration test may use by name."""

from tests.support.migration import pair
from tests.support.tlscreds import nbdkit_tls

__all__ = ["nbdkit_tls", "pair"]
