"""memplan: will it fit? Peak-VRAM prediction for LLM fine-tuning."""
