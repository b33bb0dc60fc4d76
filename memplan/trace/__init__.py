"""Exact mode and model building with torch/transformers/peft (imported only inside this package's functions)."""
