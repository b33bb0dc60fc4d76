"""Probe: real training steps, measured (torch imported only inside functions)."""
