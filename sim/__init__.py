"""Discrete-event drift simulator: drives the real guest controller in virtual time."""
