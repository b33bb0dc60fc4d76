"""The files people train with, one module per format, each with its reader and writer side by side:
`llamafactory` (training YAML), `deepspeed` (the JSON a YAML or HF names), `hf` (TrainingArguments keywords,
command-line flags, a live Trainer's arguments), `plan` (memplan's own JSON, and `write_plan` for every format)."""
