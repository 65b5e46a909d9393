"""Post-training: LoRA / QLoRA adapters (`megalm.posttrain.lora`)."""
