"""Scripts run by the system python (python3-libnbd), and data helpers they share."""
