"""Probe: real training steps in a child process, measured (`launch` spawns `_worker`, which imports torch; the
caller never does)."""
