"""flexnbd: a fast NBD server with live migration."""

__version__ = "0.6.0"
