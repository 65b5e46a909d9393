"""Inference: loading checkpoints, KV-cache generation, evaluation and weight-only quantization.

`loading.load_model` reads a checkpoint (or a quantized model directory) with its tokenizer;
`generate.generate` continues prompts; `evaluate` scores perplexity and multiple-choice tasks;
`quantize` holds INT8 / INT4 / GPTQ weight-only quantization.
"""
