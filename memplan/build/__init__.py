"""The real stack's building blocks, shared by the exact trace, the probe's worker and the CPU ground truth (so
all three run the very same model): model + peft wrapper (`model`), the optimizer HF Trainer creates (`model`),
the reference training step (`step`) and FSDP2 wrapping (`shard`). torch / transformers / peft are imported inside
the functions."""
