"""Fixtures every integration test may use by name."""

from tests.support.migration import pair
from tests.support.tlscreds import kind, nbdkit_tls, psk, x509

__all__ = ["kind", "nbdkit_tls", "pair", "psk", "x509"]
