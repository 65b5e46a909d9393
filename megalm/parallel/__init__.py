"""Parallelism on torch.distributed, one module per form (see docs/PARALLELISM.md).

state (process groups, rank order), mappings (autograd collectives), tensor (column / row parallel
linear, vocab-parallel embedding), cross_entropy (vocab-parallel loss), random (RNG tracker),
pipeline (1F1B and interleaved schedules), data_parallel (gradient buckets), distributed_optimizer
(ZeRO-1), clip_grads (the global gradient norm), expert (expert parallelism for MoE layers).
"""
