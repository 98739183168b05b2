"""What the tests share that is not a fake peer: clients (raw and real), reference models,
process fixtures and helpers. Fake peers (destinations, relays, senders, LD_PRELOAD shims)
are in tests/fakes/; no test module imports another."""
