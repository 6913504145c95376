"""Training: LoRA supervised fine-tuning, with training-time steering."""
