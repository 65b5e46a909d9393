"""Parallelism on torch.distributed: process groups, tensor-parallel layers, data parallel."""
