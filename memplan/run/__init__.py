"""Run and retune: launch the training, and after an OOM re-plan with the same effective batch and resume."""
