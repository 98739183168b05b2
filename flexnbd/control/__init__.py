"""The control socket: its grammar (``protocol``), the listener in the server (``server``) and
the client modes that talk to it (``client``)."""
