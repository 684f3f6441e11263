"""Conformance tests: each protocol checked against the real part and the fake (trio-style `check_*`)."""
