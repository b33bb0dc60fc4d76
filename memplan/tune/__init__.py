"""Tune: an Optuna study, steered by the estimator, that probes few configurations (optuna imported in functions)."""
