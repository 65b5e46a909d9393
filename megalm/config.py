"""Configuration dataclasses: the single source of every option.

Each field is one command-line flag. `megalm.arguments` derives the flag name (``num_layers`` ->
``--num-layers``), its type, default and help text from the field, so adding an option means adding
one field here. Names follow Megatron-LM where it has one. A field's ``metadata`` may carry:

- ``help``: the help text (required);
- ``flag``: an explicit flag name when Megatron's differs from the field name
  (``add_bias_linear`` is switched off by ``--disable-bias-linear``);
- ``choices``: the allowed values;
- ``type``: a parser for the flag's string when the annotation's type is not enough
  (``--moe-layer-freq`` takes an int or a per-layer pattern);
- ``metavar``: the value's name in ``--help`` when the type's (``N`` for an int, ``X`` for a float)
  says too little (``--save DIR``);
- ``group``: the ``--help`` group of the flag when it is not its dataclass's usual one
  (``--num-experts`` is under "mixture of experts").

A help text that states the default itself ("(default: one per query head)") is shown as is;
otherwise ``--help`` adds the default. ``%`` is written ``%%`` (argparse formats the text).

``Config.validate`` checks cross-field rules at start-up and raises `ConfigError` naming the flag
at fault, so a bad command line never fails deep inside a run; it changes nothing.
``Config.resolve(data_parallel_size)`` returns a copy with the derived values filled in (the global
batch, the iterations of --train-tokens, the decay length), once the process group knows the
data-parallel size.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional, Union


class ConfigError(ValueError):
    """A flag, or a combination of flags, that cannot work. The message names the flag."""


# --data-parallel-sharding-strategy, Megatron-LM's names; the ZeRO stage of each (0: plain data parallelism).
SHARDING_STRATEGIES = {"no_shard": 0, "optim": 1, "optim_grads": 2, "optim_grads_params": 3}

# The --tokenizer-type names, Megatron-LM's and our own MegaBPE; megalm.data.tokenizer builds each.
TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "MegaBPE",
                   "NullTokenizer")

_MAX_PATTERN = 1_000_000


def _pattern_value(node: ast.AST):
    """The value of a list expression made of int literals, lists, + and * (nothing else runs)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List):
        return [_pattern_value(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _pattern_value(node.left), _pattern_value(node.right)
        if isinstance(node.op, ast.Mult):
            times, items = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(items, list) and isinstance(times, int) and len(items) * max(times, 0) > _MAX_PATTERN:
                raise ValueError("the pattern is too long")
            if isinstance(items, int) and isinstance(times, int) and abs(times * items) > _MAX_PATTERN:
                raise ValueError("a number in the pattern is too large")
        elif type(left) is not type(right):
            raise ValueError("+ joins two lists or two numbers")
        return left * right if isinstance(node.op, ast.Mult) else left + right
    if isinstance(node, ast.BinOp):
        raise ValueError(f"only + and * are allowed, not {type(node.op).__name__}")
    raise ValueError(f"unexpected {type(node).__name__}")


def moe_layer_freq_type(value: str) -> Union[int, List[int]]:
    """Parse --moe-layer-freq: an int N (layer i is an MoE layer when i % N == 0) or Megatron-LM's
    per-layer pattern, a list of 0 (dense) and 1 (MoE) written as a Python list expression
    ("[0,1,1,1]", "([0]+[1]*23)"; only int literals, lists, + and * are accepted)."""
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        pattern = _pattern_value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError) as e:
        raise ConfigError(f"--moe-layer-freq takes an int or a list of 0 / 1 per layer such as "
                          f"\"([0]+[1]*3)*2\"; could not read {text!r}: {e}") from None
    if not isinstance(pattern, list) or any(x not in (0, 1) or type(x) is not int for x in pattern):
        raise ConfigError(f"--moe-layer-freq {text!r} must give a list of 0 (dense) and 1 (MoE), one per layer; "
                          f"got {pattern!r}")
    return pattern


def opt(default, help: str, flag: Optional[str] = None, choices=None, type=None,
        metavar: Optional[str] = None, group: Optional[str] = None):
    """A dataclass field that is also a command-line flag (the keywords are described above)."""
    given = dict(flag=flag, choices=None if choices is None else tuple(choices), type=type,
                 metavar=metavar, group=group)
    metadata = {"help": help, **{key: value for key, value in given.items() if value is not None}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    num_layers: int = opt(12, "Number of transformer layers.", group="model shape")
    hidden_size: int = opt(768, "Transformer hidden size.", group="model shape")
    num_attention_heads: int = opt(12, "Number of attention (query) heads.", group="model shape")
    num_query_groups: Optional[int] = opt(
        None, "Number of key/value heads for grouped-query attention (default: one per query head).",
        group="model shape")
    ffn_hidden_size: Optional[int] = opt(
        None, "MLP hidden size (default: 4 x hidden, or about 8/3 x hidden rounded to 64 with --swiglu).",
        group="model shape")
    kv_channels: Optional[int] = opt(None, "Head dimension (default: hidden-size / num-attention-heads).",
                                     group="model shape")
    seq_length: int = opt(1024, "Sequence length of each training sample, in tokens.", group="model shape")
    max_position_embeddings: Optional[int] = opt(
        None, "Size of the learned position table, and the longest sequence the model accepts "
              "(default: --seq-length).", group="model shape")
    make_vocab_size_divisible_by: int = opt(
        128, "Pad the vocabulary to a multiple of this (x tensor-parallel size) for fast matmuls.",
        group="model shape")
    position_embedding_type: str = opt(
        "learned_absolute", "Position encoding.", choices=["learned_absolute", "rope"])
    rotary_base: float = opt(10000.0, "RoPE base (theta).")
    rope_scaling_factor: Optional[float] = opt(
        None, "Llama 3 RoPE scaling: divide the low frequencies by this factor (e.g. 8; default: off).")
    rope_scaling_low_freq_factor: float = opt(
        1.0, "Llama 3 RoPE scaling: wavelengths above original-max-position / this are scaled fully.")
    rope_scaling_high_freq_factor: float = opt(
        4.0, "Llama 3 RoPE scaling: wavelengths below original-max-position / this are kept.")
    rope_scaling_original_max_position: int = opt(
        8192, "Llama 3 RoPE scaling: context length the model was pre-trained with.")
    normalization: str = opt("LayerNorm", "Normalization layer.", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = opt(1e-5, "Epsilon of the normalization layers.")
    swiglu: bool = opt(False, "Use a SwiGLU MLP instead of GELU.")
    add_bias_linear: bool = opt(True, "Drop the biases of all linear layers.", flag="--disable-bias-linear")
    add_qkv_bias: bool = opt(False, "Keep biases on the query/key/value projection even with "
                                    "--disable-bias-linear (Qwen2 style).")
    untie_embeddings_and_output_weights: bool = opt(
        False, "Give the output layer its own weight instead of sharing the input embedding.")
    attention_dropout: float = opt(0.1, "Dropout probability on the attention probabilities.")
    hidden_dropout: float = opt(0.1, "Dropout probability on the residual branches and embeddings.")
    init_method_std: float = opt(
        0.02, "Standard deviation of the normal initialisation; output projections use "
              "std / sqrt(2 x num-layers).")
    attention_backend: str = opt(
        "auto", "Attention implementation: auto picks the fastest available for the device.",
        choices=["auto", "triton", "sdpa", "reference"], group="kernels")
    normalization_backend: str = opt(
        "auto", "Normalization implementation (auto: fused kernel on a GPU, reference on CPU).",
        choices=["auto", "triton", "cuda", "reference"], group="kernels")
    cross_entropy_fusion: str = opt(
        "auto", "Fuse the output layer with the cross-entropy loss so the [tokens x vocab] logits "
                "never exist (auto: fused on a GPU).", choices=["auto", "fused", "unfused"], group="kernels")

    # Mixture of experts (megalm.model.moe, docs/MOE.md); off unless --num-experts is given.
    num_experts: Optional[int] = opt(
        None, "Routed experts per MoE layer; switches the MLP of the MoE layers to a mixture of SwiGLU "
              "experts (default: dense model).", group="mixture of experts")
    moe_ffn_hidden_size: Optional[int] = opt(
        None, "Hidden size of each routed expert (default: --ffn-hidden-size).", group="mixture of experts")
    moe_shared_expert_intermediate_size: Optional[int] = opt(
        None, "Total hidden size of the shared experts that every token passes through (DeepSeek-MoE; "
              "e.g. 2 x --moe-ffn-hidden-size for two shared experts; default: none).",
        group="mixture of experts")
    moe_shared_expert_gate: bool = opt(
        False, "Scale the shared experts' output by a learned sigmoid gate per token (Qwen2-MoE).",
        group="mixture of experts")
    moe_router_topk: int = opt(2, "Experts each token is routed to.", group="mixture of experts")
    moe_router_score_function: str = opt(
        "softmax", "Router scores: softmax over the experts (Mixtral, Qwen2-MoE, DeepSeek-MoE) or an "
                   "independent sigmoid per expert (DeepSeek-V3).", choices=["softmax", "sigmoid"],
        group="mixture of experts")
    moe_router_norm_topk_prob: bool = opt(
        False, "Renormalise the top-k scores of each token to sum to 1 (Mixtral; Qwen2-MoE's "
               "norm_topk_prob).", group="mixture of experts")
    moe_router_topk_scaling_factor: Optional[float] = opt(
        None, "Multiply the top-k routing weights by this factor (DeepSeek's routed_scaling_factor; "
              "default: 1).", group="mixture of experts")
    moe_router_enable_expert_bias: bool = opt(
        False, "Aux-loss-free load balancing (DeepSeek-V3): a per-expert bias, added to the scores for "
               "the top-k choice only, moves by --moe-router-bias-update-rate after every step toward the "
               "less loaded experts.", group="mixture of experts")
    moe_router_bias_update_rate: float = opt(
        1e-3, "Step of the expert bias per optimizer step (--moe-router-enable-expert-bias).",
        group="mixture of experts")
    moe_router_num_groups: Optional[int] = opt(
        None, "Group-limited routing (DeepSeek-V2/V3): split the experts into this many groups and route "
              "each token within its best --moe-router-group-topk groups (default: no groups).",
        group="mixture of experts")
    moe_router_group_topk: Optional[int] = opt(
        None, "Groups each token may use (--moe-router-num-groups); a group's score is the sum of its top "
              "k / group-topk scores.", group="mixture of experts")
    moe_aux_loss_coeff: float = opt(
        0.0, "Load-balancing loss coefficient (Switch / GShard: num-experts x sum_i f_i P_i per layer).",
        group="mixture of experts")
    moe_z_loss_coeff: float = opt(0.0, "Router z-loss coefficient (mean of logsumexp(router logits)^2).",
                                  group="mixture of experts")
    moe_expert_capacity_factor: Optional[float] = opt(
        None, "Expert capacity as a multiple of tokens x top-k / experts; assignments beyond it are "
              "dropped, lowest routing probability first (default: dropless).", group="mixture of experts")
    moe_pad_expert_input_to_capacity: bool = opt(
        False, "Pad every expert's input to its capacity (fixed shapes); needs --moe-expert-capacity-factor.",
        group="mixture of experts")
    moe_layer_freq: Union[int, List[int]] = opt(
        1, "Every this many layers is an MoE layer (layer i with i %% freq == 0), the others keep the dense "
           "MLP; or a per-layer pattern of 0 (dense) and 1 (MoE) as in Megatron-LM, e.g. \"([0]+[1]*23)\".",
        type=moe_layer_freq_type, metavar="N|PATTERN", group="mixture of experts")
    first_k_dense_replace: int = opt(0, "Keep the dense MLP in the first this many layers (DeepSeek-MoE).",
                                     group="mixture of experts")

    # FP8 matmuls in the attention and MLP linears (megalm.parallel.fp8, docs/TRAINING.md); off
    # unless --fp8-format is given. Flag names as in Megatron-LM.
    fp8_format: Optional[str] = opt(
        None, "Run the attention and MLP linears' GEMMs in FP8 (needs --bf16): e4m3 for every tensor, or "
              "hybrid (E4M3 forward, E5M2 gradients) (default: off).", choices=["e4m3", "hybrid"],
        group="mixed precision")
    fp8_recipe: str = opt(
        "delayed", "FP8 scaling: delayed (per tensor, from the amax history), tensorwise (per tensor, from "
                   "its current amax) or rowwise (per row along the reduction dimension).",
        choices=["delayed", "tensorwise", "rowwise"], group="mixed precision")
    fp8_amax_history_len: int = opt(1, "Delayed FP8 scaling: steps of amax history per tensor.",
                                    group="mixed precision")
    fp8_amax_compute_algo: str = opt(
        "most_recent", "Delayed FP8 scaling: the scale follows the largest amax of the history (max) or "
                       "the last step's (most_recent).", choices=["max", "most_recent"], group="mixed precision")
    first_last_layers_bf16: bool = opt(
        False, "Keep the first --num-layers-at-start-in-bf16 and last --num-layers-at-end-in-bf16 "
               "transformer layers out of FP8.", group="mixed precision")
    num_layers_at_start_in_bf16: int = opt(1, "With --first-last-layers-bf16: first layers kept in bf16.",
                                           group="mixed precision")
    num_layers_at_end_in_bf16: int = opt(1, "With --first-last-layers-bf16: last layers kept in bf16.",
                                         group="mixed precision")

    # Not flags: derived at start-up from the tokenizer (or --vocab-size): its vocabulary, and that
    # vocabulary padded for the embedding and output layer (0: not known yet).
    vocab_size: int = field(default=0, metadata={"derived": True})
    padded_vocab_size: int = field(default=0, metadata={"derived": True})

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.swiglu:
            return int((4 * self.hidden_size * 2 / 3) / 64) * 64 or 64
        return 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def moe_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_size

    def is_moe_layer(self, layer_number: int) -> bool:
        """Does layer `layer_number` (0-based) hold a mixture of experts instead of the dense MLP?"""
        if not self.num_experts or layer_number < self.first_k_dense_replace:
            return False
        freq = self.moe_layer_pattern
        if isinstance(freq, list):
            return freq[layer_number] == 1
        return layer_number % freq == 0

    @property
    def moe_layer_pattern(self) -> Union[int, List[int]]:
        """--moe-layer-freq as an int or a list, also when it was set in Python as text."""
        freq = self.moe_layer_freq
        return moe_layer_freq_type(freq) if isinstance(freq, str) else freq


@dataclass
class ParallelConfig:
    ddp_bucket_size: int = opt(
        40_000_000, "Data-parallel gradient bucket size in parameters; buckets are all-reduced "
                    "as soon as their gradients are ready, overlapping the backward pass.")
    overlap_grad_reduce: bool = opt(
        True, "Wait for the whole backward pass before reducing gradients.",
        flag="--no-overlap-grad-reduce")
    distributed_backend: str = opt(
        "auto", "torch.distributed backend (auto: nccl on GPUs, gloo on CPU).",
        choices=["auto", "nccl", "gloo"])
    distributed_timeout_minutes: int = opt(10, "Timeout of collective operations, in minutes.")
    tensor_model_parallel_size: int = opt(
        1, "Tensor-parallel size: ranks that split every layer's matmuls (attention heads, FFN, "
           "vocabulary); keep it within a node.")
    pipeline_model_parallel_size: int = opt(
        1, "Pipeline-parallel size: ranks that split the layers into consecutive stages.")
    num_layers_per_virtual_pipeline_stage: Optional[int] = opt(
        None, "Layers per virtual pipeline stage: each pipeline rank holds several model chunks and "
              "runs the interleaved 1F1B schedule (default: one chunk per rank, plain 1F1B).")
    sequence_parallel: bool = opt(
        False, "With tensor parallelism, also split the norm and dropout regions along the sequence "
               "(their activations shrink by the tensor-parallel size).")
    use_distributed_optimizer: bool = opt(
        False, "Shard the optimizer state across data-parallel ranks (ZeRO-1): gradients are "
               "reduce-scattered, each rank updates its shard, parameters are all-gathered.")
    data_parallel_sharding_strategy: Optional[str] = opt(
        None, "What data-parallel ranks shard (ZeRO stages): no_shard (plain all-reduce), optim (optimizer "
              "state, ZeRO-1, as --use-distributed-optimizer), optim_grads (and gradients, reduce-scattered "
              "bucket by bucket, ZeRO-2), optim_grads_params (and parameters, all-gathered one transformer "
              "layer at a time, ZeRO-3) (default: optim with --use-distributed-optimizer, else no_shard).",
        choices=list(SHARDING_STRATEGIES))
    optimizer_cpu_offload: bool = opt(
        False, "Keep the fp32 master weights and optimizer state of this rank's shard in (pinned) CPU memory "
               "and run the optimizer step there (needs a sharding strategy: --use-distributed-optimizer).")
    recompute_granularity: Optional[str] = opt(
        None, "Activation recompute: full (whole layers, keep only their inputs) or selective (the "
              "attention core only).", choices=["full", "selective"], group="activation recompute")
    recompute_method: str = opt(
        "uniform", "Full recompute: uniform (checkpoint groups of --recompute-num-layers layers) or "
                   "block (checkpoint only the first --recompute-num-layers layers of each stage).",
        choices=["uniform", "block"], group="activation recompute")
    recompute_num_layers: int = opt(
        1, "Full recompute: layers per checkpointed group (uniform) or per stage (block).",
        group="activation recompute")
    expert_model_parallel_size: int = opt(
        1, "Expert-parallel size: ranks that split each MoE layer's experts, exchanging tokens by "
           "all-to-all; carved out of the data-parallel ranks.")

    @property
    def sharding_strategy(self) -> str:
        """--data-parallel-sharding-strategy, with --use-distributed-optimizer's optim as default."""
        return self.data_parallel_sharding_strategy or ("optim" if self.use_distributed_optimizer else "no_shard")


@dataclass
class OptimConfig:
    optimizer: str = opt("adam", "Optimizer: AdamW (decoupled weight decay) or Lion.",
                         choices=["adam", "lion"])
    lr: float = opt(3e-4, "Peak learning rate.", group="learning-rate schedule")
    min_lr: float = opt(0.0, "Learning rate at the end of the decay.", group="learning-rate schedule")
    lr_warmup_iters: int = opt(0, "Iterations of linear warm-up from 0 to --lr.",
                               group="learning-rate schedule")
    lr_decay_style: str = opt("cosine", "Decay after the warm-up.",
                              choices=["constant", "linear", "cosine", "WSD"], group="learning-rate schedule")
    lr_decay_iters: Optional[int] = opt(None, "Iteration at which the decay reaches --min-lr "
                                              "(default: --train-iters).", group="learning-rate schedule")
    lr_wsd_decay_iters: Optional[int] = opt(
        None, "WSD: length of the final decay phase in iterations (default: 10%% of the decay span).",
        group="learning-rate schedule")
    lr_wsd_decay_style: str = opt("linear", "WSD: shape of the final decay phase.",
                                  choices=["linear", "cosine", "exponential", "minus_sqrt"],
                                  group="learning-rate schedule")
    weight_decay: float = opt(0.01, "Decoupled weight decay (not applied to norms and biases).")
    adam_beta1: float = opt(0.9, "First moment coefficient (AdamW and Lion).")
    adam_beta2: float = opt(0.999, "Second moment coefficient (AdamW; Lion's momentum decay).")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    clip_grad: float = opt(1.0, "Clip the global gradient L2 norm to this value (0 disables).")
    loss_scale: Optional[float] = opt(None, "fp16: a static loss scale (default: dynamic).",
                                      group="mixed precision")
    initial_loss_scale: float = opt(2.0 ** 32, "fp16: initial dynamic loss scale.", group="mixed precision")
    min_loss_scale: float = opt(1.0, "fp16: the dynamic loss scale never goes below this.",
                                group="mixed precision")
    loss_scale_window: int = opt(1000, "fp16: steps without overflow before the scale doubles.",
                                 group="mixed precision")
    hysteresis: int = opt(2, "fp16: overflows tolerated before the scale halves.", group="mixed precision")


@dataclass
class TrainConfig:
    micro_batch_size: int = opt(4, "Samples per forward/backward pass on each data-parallel rank.")
    global_batch_size: Optional[int] = opt(
        None, "Samples per optimizer step over all ranks; the rest is gradient accumulation "
              "(default: micro batch x data-parallel size).")
    train_iters: Optional[int] = opt(None, "Optimizer steps to train for.")
    train_tokens: Optional[int] = opt(None, "Train until this many tokens are consumed "
                                            "(alternative to --train-iters).")
    seed: int = opt(1234, "Random seed for initialisation, dropout and data order.")
    bf16: bool = opt(False, "bfloat16 mixed precision (autocast; fp32 master weights).",
                     group="mixed precision")
    fp16: bool = opt(False, "float16 mixed precision with dynamic loss scaling.", group="mixed precision")
    save: Optional[str] = opt(None, "Directory to write checkpoints to.", metavar="DIR", group="checkpoints")
    load: Optional[str] = opt(
        None, "Checkpoint to start from: a --save directory (its latest checkpoint) or one iter_XXXXXXX "
              "directory. A directory without a checkpoint is an error, unless it is also --save (resuming "
              "a run that may not have saved yet).", metavar="DIR", group="checkpoints")
    save_interval: Optional[int] = opt(None, "Save a checkpoint every this many iterations.",
                                       group="checkpoints")
    load_fallback: bool = opt(
        False, "If the latest checkpoint is unreadable, resume from the newest readable one "
               "instead of stopping.", group="checkpoints")
    verify_checkpoint: bool = opt(
        True, "Do not compare the checkpoint files read at --load with the checksums recorded when they were "
              "saved (the check reads every file once more).", flag="--no-verify-checkpoint",
        group="checkpoints")
    no_load_optim: bool = opt(False, "Load model weights only, not the optimizer state.", group="checkpoints")
    no_load_rng: bool = opt(False, "Do not restore the random number generator states.", group="checkpoints")
    finetune: bool = opt(False, "Load weights only and start from iteration 0 "
                                "(no optimizer, scheduler or data position).", group="checkpoints")
    eval_interval: int = opt(1000, "Evaluate on the validation set every this many iterations.",
                             group="logging and evaluation")
    eval_iters: int = opt(100, "Validation iterations per evaluation, each over one global batch "
                               "(--global-batch-size samples, whatever the parallel layout; 0 disables).",
                          group="logging and evaluation")
    log_interval: int = opt(100, "Print a log line every this many iterations.", group="logging and evaluation")
    tensorboard_dir: Optional[str] = opt(None, "Write TensorBoard scalars here.",
                                         metavar="DIR", group="logging and evaluation")
    exit_interval: Optional[int] = opt(None, "Save (if --save) and exit at this iteration.")
    compile: bool = opt(False, "Compile the model with torch.compile.")
    device: str = opt("auto", "Device to train on (auto: cuda when available).",
                      choices=["auto", "cuda", "cpu"])
    peak_flops: Optional[float] = opt(
        None, "Peak dense FLOP/s of one device for MFU (default: looked up from the device name).",
        group="logging and evaluation")


@dataclass
class DataConfig:
    data_path: list = opt([], "Dataset prefix(es), optionally weighted: --data-path 0.3 A 0.7 B.",
                          metavar="[WEIGHT] PREFIX")
    split: str = opt("969,30,1", "Train/valid/test proportions of each dataset.", metavar="N,N,N")
    mock_data: bool = opt(False, "Train on a deterministic synthetic token stream (no files).")
    tokenizer_type: Optional[str] = opt(
        None, "The tokenizer tools/preprocess_data.py used: GPT2BPETokenizer needs --vocab-file and "
              "--merge-file; SentencePieceTokenizer, HuggingFaceTokenizer and MegaBPE (ours) --tokenizer-model; "
              "NullTokenizer (the data is token ids) --vocab-size.",
        choices=TOKENIZER_TYPES, group="tokenizer")
    tokenizer_model: Optional[str] = opt(None, "Tokenizer file (tokenizer.json, tokenizer.model, "
                                               "or a directory holding one).",
                                         metavar="PATH", group="tokenizer")
    vocab_file: Optional[str] = opt(None, "GPT-2 vocab.json.", metavar="PATH", group="tokenizer")
    merge_file: Optional[str] = opt(None, "GPT-2 merges.txt.", metavar="PATH", group="tokenizer")
    vocab_size: Optional[int] = opt(None, "Vocabulary size for NullTokenizer / --mock-data.", group="tokenizer")
    data_cache_path: Optional[str] = opt(None, "Where to cache dataset indices "
                                               "(default: next to the data).", metavar="DIR")
    num_workers: int = opt(0, "DataLoader worker processes.")
    reset_position_ids: bool = opt(
        False, "Restart the position ids after each end-of-document token (packed pre-training data).")
    reset_attention_mask: bool = opt(
        False, "No attention across end-of-document tokens: each document in a sequence sees only itself.")
    eod_mask_loss: bool = opt(False, "No loss at the positions whose input is an end-of-document token (the "
                              "prediction that crosses into the next document), as Megatron-LM.")


# The --task values of posttrain_gpt.py.
POSTTRAIN_TASKS = ("sft", "distill", "grpo", "dpo", "reward")
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "cdpo", "simpo")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class PostTrainConfig:
    """Flags of posttrain_gpt.py (supervised fine-tuning, LoRA / QLoRA, distillation)."""
    task: str = opt("sft", "What to train: sft (supervised fine-tuning on chat / prompt-completion / text "
                    "jsonl) or distill (a student from a teacher's logits).", choices=POSTTRAIN_TASKS,
                    group="post-training")
    chat_template: Optional[str] = opt(
        None, "A Jinja chat template file (default: the tokenizer directory's chat template, else "
        "megalm's own).", metavar="PATH", group="post-training")
    packing: bool = opt(False, "Pack several samples into each --seq-length row; position ids restart "
                        "and attention stops at each sample's boundary.", group="post-training")
    train_on_prompt: bool = opt(False, "Also train on the prompt / user tokens (default: only on assistant "
                                "tokens and completions).", group="post-training")
    lora_rank: int = opt(0, "LoRA rank (0: full fine-tuning).", group="LoRA")
    lora_alpha: float = opt(16.0, "LoRA scaling numerator: the update is (alpha / rank) B A, or "
                            "(alpha / sqrt(rank)) B A with --use-rslora.", group="LoRA")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch's input.", group="LoRA")
    lora_target_modules: list = opt(
        ["q_proj", "v_proj"], "Linear layers that get adapters, by their Hugging Face names: q_proj k_proj "
        "v_proj o_proj gate_proj up_proj down_proj, or all-linear.", metavar="NAME", group="LoRA")
    use_rslora: bool = opt(False, "Rank-stabilised LoRA: scale by alpha / sqrt(rank).", group="LoRA")
    lora_base_quantization: Optional[str] = opt(
        None, "QLoRA: hold the frozen base weights of the adapted layers quantized (weight-only, "
        "per-group) and de-quantize them in the forward pass.", choices=["int8", "int4"], group="LoRA")
    dpo_loss: str = opt("sigmoid", "dpo: the preference loss of the log-ratio margin (TRL's formulas): sigmoid "
                        "(DPO), ipo, hinge (SLiC), robust (rDPO), cdpo (conservative DPO), simpo (reference-free, "
                        "length-normalised, with --simpo-gamma).", choices=DPO_LOSSES, group="DPO")
    label_smoothing: float = opt(0.0, "dpo --dpo-loss robust / cdpo / simpo: the assumed probability that a "
                                 "pair's preference is flipped, in [0, 0.5).", group="DPO")
    simpo_gamma: float = opt(0.5, "dpo --dpo-loss simpo: the target reward margin gamma.", group="DPO")
    precompute_ref_logps: bool = opt(False, "dpo: compute the reference model's log-probabilities of every pair "
                                     "once before training (then no reference model is held while training).",
                                     group="DPO")
    ref_load: Optional[str] = opt(None, "dpo: the reference model's checkpoint (default: --load, the model "
                                  "training starts from; unused with LoRA, whose base is the reference).",
                                  metavar="DIR", group="DPO")
    center_rewards_coefficient: Optional[float] = opt(
        None, "reward: add coefficient x mean((r_chosen + r_rejected)^2) to the loss, which keeps rewards "
        "centred on 0.", group="reward model")
    teacher_load: Optional[str] = opt(
        None, "distill: the teacher's checkpoint directory (megalm, or imported from Hugging Face).",
        metavar="DIR", group="distillation")
    teacher_logits: Optional[str] = opt(
        None, "distill: a directory of cached teacher top-k logits (tools/cache_teacher_logits.py) "
        "instead of running the teacher.", metavar="DIR", group="distillation")
    kd_ratio: float = opt(0.5, "distill: loss = (1 - ratio) x cross-entropy + ratio x distillation loss.",
                          group="distillation")
    kd_loss: str = opt("forward_kl", "distill: the distillation loss (jsd: generalized Jensen-Shannon "
                       "with --kd-beta; beta 0 is forward KL, 1 reverse KL).", choices=KD_LOSSES,
                       group="distillation")
    kd_beta: float = opt(0.5, "distill: the generalized JSD's beta.", group="distillation")
    kd_temperature: float = opt(1.0, "distill: softmax temperature of teacher and student.", group="distillation")
    num_generations: int = opt(8, "grpo: completions sampled per prompt (the group G).", group="GRPO")
    max_completion_length: int = opt(256, "grpo: most new tokens per completion.", group="GRPO")
    temperature: float = opt(1.0, "grpo: sampling temperature (also applied to the log-probabilities).",
                             group="GRPO")
    top_p: float = opt(1.0, "grpo: nucleus sampling threshold in (0, 1] (1: off).", group="GRPO")
    top_k: int = opt(0, "grpo: sample among the k most likely tokens (0: off).", group="GRPO")
    reward_fn: list = opt([], "grpo: reward functions, module:function (TRL's signature: prompts, completions, "
                          "completion_ids, **columns -> list of float or None; megalm.posttrain.rewards has "
                          "ready-made ones), or the checkpoint directory of a reward model (--task reward).",
                          metavar="MODULE:FUNCTION|DIR", group="GRPO")
    reward_weights: list = opt([], "grpo: one weight per --reward-fn (default: 1 each).", metavar="W", group="GRPO")
    scale_rewards: str = opt("group", "grpo: divide the advantages by the std of the group's rewards, of the "
                             "batch's, or not at all.", choices=SCALE_REWARDS, group="GRPO")
    loss_type: str = opt("dapo", "grpo: how the per-token losses are averaged, as TRL: grpo (per sequence, then "
                         "over sequences), bnpo (over the micro-batch's tokens), dr_grpo (by batch x "
                         "--max-completion-length), dapo (over the global batch's tokens).",
                         choices=GRPO_LOSS_TYPES, group="GRPO")
    epsilon: float = opt(0.2, "grpo: lower clipping range of the probability ratio.", group="GRPO")
    epsilon_high: Optional[float] = opt(None, "grpo: upper clipping range (default --epsilon; DAPO uses 0.28).",
                                        group="GRPO")
    beta: Optional[float] = opt(None, "The strength of the pull to the reference model. dpo: the beta of the loss "
                                "(default 0.1); grpo: the coefficient of the KL to it (k3 estimator; default 0, "
                                "which builds no reference model).", group="post-training")
    num_iterations: int = opt(1, "grpo: optimizer steps on each batch of rollouts (mu); rollouts are generated "
                              "every mu iterations.", group="GRPO")

    def validate(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank must not be negative, got {self.lora_rank}")
        if self.lora_rank and self.lora_alpha <= 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_rank:
            for flag, given in (("--use-rslora", self.use_rslora),
                                ("--lora-base-quantization", self.lora_base_quantization)):
                if given:
                    raise ConfigError(f"{flag} needs LoRA adapters: give --lora-rank R")
        self._validate_preference()
        if self.task == "distill":
            if (self.teacher_load is None) == (self.teacher_logits is None):
                raise ConfigError("--task distill needs one teacher: --teacher-load DIR (run online) or "
                                  "--teacher-logits DIR (cached top-k)")
            if not 0.0 <= self.kd_ratio <= 1.0:
                raise ConfigError(f"--kd-ratio must be in [0, 1], got {self.kd_ratio}")
            if not 0.0 <= self.kd_beta <= 1.0:
                raise ConfigError(f"--kd-beta must be in [0, 1], got {self.kd_beta}")
            if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
                raise ConfigError(f"--kd-temperature must be positive, got {self.kd_temperature}")
        else:
            for flag, given in (("--teacher-load", self.teacher_load), ("--teacher-logits", self.teacher_logits)):
                if given is not None:
                    raise ConfigError(f"{flag} is for --task distill (the task is {self.task})")
        if self.task == "grpo":
            self._validate_grpo()
        elif self.reward_fn:
            raise ConfigError(f"--reward-fn is for --task grpo (the task is {self.task})")

    def _validate_grpo(self) -> None:
        if not self.reward_fn:
            raise ConfigError("--task grpo needs a reward: give --reward-fn MODULE:FUNCTION (e.g. "
                              "megalm.posttrain.rewards:exact_match_answer)")
        if self.reward_weights:
            if len(self.reward_weights) != len(self.reward_fn):
                raise ConfigError(f"--reward-weights gives {len(self.reward_weights)} weights for "
                                  f"{len(self.reward_fn)} --reward-fn functions: give one per function")
            for w in self.reward_weights:
                try:
                    ok = math.isfinite(float(w))
                except ValueError:
                    ok = False
                if not ok:
                    raise ConfigError(f"--reward-weights: {w} is not a finite number")
        if self.num_generations < 2:
            raise ConfigError(f"--num-generations must be at least 2 (a group's rewards are compared with their "
                              f"mean), got {self.num_generations}")
        if self.max_completion_length < 1:
            raise ConfigError(f"--max-completion-length must be positive, got {self.max_completion_length}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature must be positive (GRPO samples its completions), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must not be negative, got {self.top_k}")
        for flag, value in (("--epsilon", self.epsilon), ("--epsilon-high", self.epsilon_high)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be positive, got {value}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"--beta must not be negative, got {self.beta}")
        if self.num_iterations < 1:
            raise ConfigError(f"--num-iterations must be at least 1, got {self.num_iterations}")

    def _validate_preference(self) -> None:
        dpo, defaults = self.task == "dpo", PostTrainConfig()
        if not dpo:
            for flag, field_name in (("--dpo-loss", "dpo_loss"), ("--label-smoothing", "label_smoothing"),
                                     ("--simpo-gamma", "simpo_gamma"), ("--precompute-ref-logps", "precompute_ref_logps"),
                                     ("--ref-load", "ref_load")):
                if getattr(self, field_name) != getattr(defaults, field_name):
                    raise ConfigError(f"{flag} is for --task dpo (the task is {self.task})")
        if self.task != "reward" and self.center_rewards_coefficient is not None:
            raise ConfigError(f"--center-rewards-coefficient is for --task reward (the task is {self.task})")
        if self.center_rewards_coefficient is not None and not (
                math.isfinite(self.center_rewards_coefficient) and self.center_rewards_coefficient >= 0):
            raise ConfigError(f"--center-rewards-coefficient must not be negative, got {self.center_rewards_coefficient}")
        if not dpo:
            return
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"--beta must be positive for --task dpo, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.dpo_loss not in ("robust", "cdpo", "simpo"):
            raise ConfigError(f"--label-smoothing is for --dpo-loss robust, cdpo or simpo (the loss is "
                              f"{self.dpo_loss})")
        if self.simpo_gamma != defaults.simpo_gamma and self.dpo_loss != "simpo":
            raise ConfigError(f"--simpo-gamma is for --dpo-loss simpo (the loss is {self.dpo_loss})")
        if self.dpo_loss == "simpo" and (self.precompute_ref_logps or self.ref_load):
            flag = "--precompute-ref-logps" if self.precompute_ref_logps else "--ref-load"
            raise ConfigError(f"{flag}: --dpo-loss simpo uses no reference model; leave it out")


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "posttrain": PostTrainConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Rebuild from `to_dict` output; keys unknown to this version are ignored."""
        sections = {}
        for name, klass in SECTIONS.items():
            known = {f.name for f in dataclasses.fields(klass)}
            sections[name] = klass(**{k: v for k, v in d.get(name, {}).items() if k in known})
        return cls(**sections)

    def validate(self, data_parallel_size: int = 1) -> "Config":
        """Check every rule, changing nothing; raises ConfigError naming the flag. Returns self.

        The rules that depend on the data-parallel size (the global batch) are checked for
        `data_parallel_size`; `resolve` checks them again once the process group knows it."""
        m, t, o, d = self.model, self.train, self.optim, self.data
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "make_vocab_size_divisible_by"):
            if getattr(m, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(m, name)}")
        if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
            raise ConfigError(
                f"--num-attention-heads ({m.num_attention_heads}) must divide --hidden-size "
                f"({m.hidden_size}), or set --kv-channels explicitly")
        if m.num_query_groups is not None:
            if m.num_query_groups <= 0 or m.num_attention_heads % m.num_query_groups:
                raise ConfigError(
                    f"--num-query-groups ({m.num_query_groups}) must divide --num-attention-heads "
                    f"({m.num_attention_heads})")
        if m.position_embedding_type == "rope" and m.head_dim % 2:
            raise ConfigError(f"rope needs an even head dimension, got {m.head_dim} (--kv-channels)")
        if m.max_positions < m.seq_length:
            raise ConfigError(
                f"--max-position-embeddings ({m.max_position_embeddings}) is smaller than "
                f"--seq-length ({m.seq_length})")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(m, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(m, name)}")

        self.validate_layout()
        self._validate_batch(data_parallel_size)
        if t.bf16 and t.fp16:
            raise ConfigError("--bf16 and --fp16 are mutually exclusive: choose one")
        if t.train_iters is None and t.train_tokens is None:
            raise ConfigError("give the length of training with --train-iters or --train-tokens")
        if t.train_iters is not None and t.train_tokens is not None:
            raise ConfigError("--train-iters and --train-tokens are mutually exclusive: choose one")
        if t.train_iters is not None and t.train_iters <= 0:
            raise ConfigError(f"--train-iters must be positive, got {t.train_iters}")
        if t.train_tokens is not None and t.train_tokens <= 0:
            raise ConfigError(f"--train-tokens must be positive, got {t.train_tokens}")
        if t.save_interval is not None and t.save_interval <= 0:
            raise ConfigError(f"--save-interval must be positive, got {t.save_interval}")
        if t.save_interval is not None and t.save is None:
            raise ConfigError("--save-interval needs --save DIR to know where to write checkpoints")
        if t.log_interval <= 0 or t.eval_interval <= 0:
            raise ConfigError("--log-interval and --eval-interval must be positive")
        if t.eval_iters < 0:
            raise ConfigError(f"--eval-iters must not be negative, got {t.eval_iters}")

        if o.lr < 0 or o.min_lr < 0:
            raise ConfigError("--lr and --min-lr must not be negative")
        if o.min_lr > o.lr:
            raise ConfigError(f"--min-lr ({o.min_lr}) is larger than --lr ({o.lr})")
        if o.lr_warmup_iters < 0:
            raise ConfigError(f"--lr-warmup-iters must not be negative, got {o.lr_warmup_iters}")
        decay_iters = o.lr_decay_iters if o.lr_decay_iters is not None else self._train_iters(data_parallel_size)
        if o.lr_warmup_iters > decay_iters:
            raise ConfigError(
                f"--lr-warmup-iters ({o.lr_warmup_iters}) is longer than --lr-decay-iters "
                f"({decay_iters})")
        if o.clip_grad < 0:
            raise ConfigError(f"--clip-grad must not be negative, got {o.clip_grad}")
        self._validate_loss_scale()
        self._validate_fp8()

        if not d.mock_data and not d.data_path:
            raise ConfigError("no training data: give --data-path PREFIX (from tools/preprocess_data.py) "
                              "or --mock-data for a synthetic stream")
        if d.mock_data and d.data_path:
            raise ConfigError("--mock-data and --data-path are mutually exclusive: choose one")
        if d.mock_data and d.tokenizer_type in (None, "NullTokenizer") and not d.vocab_size:
            raise ConfigError("--mock-data with NullTokenizer needs --vocab-size N")
        if d.tokenizer_type is None and not d.mock_data:
            raise ConfigError("--data-path needs --tokenizer-type (and its --tokenizer-model / "
                              "--vocab-file / --merge-file) matching the tokenizer used by "
                              "tools/preprocess_data.py")
        if d.tokenizer_type == "NullTokenizer" and not d.vocab_size:
            raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size N")
        if d.num_workers < 0:
            raise ConfigError(f"--num-workers must not be negative, got {d.num_workers}")
        self.posttrain.validate()
        return self

    def resolve(self, data_parallel_size: int = 1) -> "Config":
        """A validated copy with every derived field filled in for `data_parallel_size` (the global
        batch, the iterations of --train-tokens, the decay length, a --moe-layer-freq pattern given
        as text). The config itself is left as given, so it can be resolved again for another size."""
        self.validate(data_parallel_size)
        resolved = copy.deepcopy(self)
        t, o, m = resolved.train, resolved.optim, resolved.model
        t.global_batch_size = self._global_batch_size(data_parallel_size)
        t.train_iters = self._train_iters(data_parallel_size)
        t.train_tokens = None
        if o.lr_decay_iters is None:
            o.lr_decay_iters = t.train_iters
        m.moe_layer_freq = m.moe_layer_pattern
        return resolved

    def _global_batch_size(self, data_parallel_size: int) -> int:
        t = self.train
        return t.micro_batch_size * data_parallel_size if t.global_batch_size is None else t.global_batch_size

    def _train_iters(self, data_parallel_size: int) -> int:
        t = self.train
        if t.train_iters is not None:
            return t.train_iters
        return math.ceil(t.train_tokens / (self._global_batch_size(data_parallel_size) * self.model.seq_length))

    def _validate_batch(self, data_parallel_size: int) -> None:
        t = self.train
        if t.micro_batch_size <= 0:
            raise ConfigError(f"--micro-batch-size must be positive, got {t.micro_batch_size}")
        global_batch = self._global_batch_size(data_parallel_size)
        if global_batch <= 0 or global_batch % (t.micro_batch_size * data_parallel_size):
            raise ConfigError(
                f"--global-batch-size ({global_batch}) must be divisible by --micro-batch-size "
                f"({t.micro_batch_size}) x data-parallel size ({data_parallel_size})")
        num_microbatches = global_batch // (t.micro_batch_size * data_parallel_size)
        pp = self.parallel.pipeline_model_parallel_size
        if self.parallel.num_layers_per_virtual_pipeline_stage and num_microbatches % pp:
            raise ConfigError(
                f"the interleaved schedule (--num-layers-per-virtual-pipeline-stage) needs the number "
                f"of micro-batches per step ({num_microbatches} = --global-batch-size / (--micro-batch-size"
                f" x data-parallel size {data_parallel_size})) to be a multiple of "
                f"--pipeline-model-parallel-size ({pp})")

    def _validate_loss_scale(self) -> None:
        """fp16 loss scaling: a scale of 0 divides by zero when gradients are unscaled, and a scale
        below 1 shrinks gradients that fp16 already struggles to represent (1e-30 makes them all 0)."""
        o = self.optim
        if o.loss_scale is not None and not (math.isfinite(o.loss_scale) and o.loss_scale >= 1):
            raise ConfigError(f"--loss-scale must be a finite number of at least 1, got {o.loss_scale} "
                              f"(or leave it out for dynamic loss scaling)")
        if not (math.isfinite(o.min_loss_scale) and o.min_loss_scale > 0):
            raise ConfigError(f"--min-loss-scale must be positive, got {o.min_loss_scale}")
        if not (math.isfinite(o.initial_loss_scale) and o.initial_loss_scale >= max(o.min_loss_scale, 1.0)):
            raise ConfigError(f"--initial-loss-scale must be a finite number of at least 1 and of --min-loss-scale "
                              f"({o.min_loss_scale}), got {o.initial_loss_scale}")
        if o.loss_scale_window <= 0:
            raise ConfigError(f"--loss-scale-window must be positive, got {o.loss_scale_window}")
        if o.hysteresis <= 0:
            raise ConfigError(f"--hysteresis must be positive, got {o.hysteresis}")

    def _validate_fp8(self) -> None:
        m = self.model
        if m.fp8_format is None:
            if m.first_last_layers_bf16:
                raise ConfigError("--first-last-layers-bf16 keeps layers out of FP8: it needs --fp8-format")
            return
        for name, allowed in (("fp8_format", ("e4m3", "hybrid")), ("fp8_recipe", ("delayed", "tensorwise", "rowwise")),
                              ("fp8_amax_compute_algo", ("max", "most_recent"))):
            if getattr(m, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(m, name)!r}: expected one of {', '.join(allowed)}")
        if not self.train.bf16:
            raise ConfigError("--fp8-format needs --bf16: the FP8 GEMMs take and return bf16 activations "
                              "(add --bf16, and drop --fp16)")
        if m.num_experts:
            raise ConfigError("--fp8-format does not cover the MoE experts' grouped GEMM: train an MoE model "
                              "(--num-experts) without --fp8-format")
        if m.fp8_amax_history_len <= 0:
            raise ConfigError(f"--fp8-amax-history-len must be positive, got {m.fp8_amax_history_len}")
        if m.fp8_recipe != "delayed" and (m.fp8_amax_history_len != 1 or m.fp8_amax_compute_algo != "most_recent"):
            raise ConfigError(f"--fp8-amax-history-len and --fp8-amax-compute-algo set delayed scaling, but "
                              f"--fp8-recipe is {m.fp8_recipe}: use --fp8-recipe delayed or drop them")
        if m.first_last_layers_bf16:
            start, end = m.num_layers_at_start_in_bf16, m.num_layers_at_end_in_bf16
            if start < 0 or end < 0:
                raise ConfigError("--num-layers-at-start-in-bf16 and --num-layers-at-end-in-bf16 must not be negative")
            if start + end >= m.num_layers:
                raise ConfigError(f"--num-layers-at-start-in-bf16 ({start}) + --num-layers-at-end-in-bf16 ({end}) "
                                  f"leave none of the {m.num_layers} layers (--num-layers) in FP8")

    def validate_layout(self) -> None:
        """The model-parallel sizes (tensor, pipeline, virtual, expert) against the model's shape.
        The world size is checked at start-up, when it is known."""
        self._validate_parallel()
        self._validate_moe()

    def _validate_parallel(self) -> None:
        """Model-parallel sizes against the model's shape (the world size is checked at start-up)."""
        m, p = self.model, self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if tp <= 0 or pp <= 0:
            raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be positive")
        for what, value in (("--num-attention-heads", m.num_attention_heads),
                            ("--num-query-groups", m.query_groups), ("--ffn-hidden-size", m.ffn_size)):
            if value % tp:
                raise ConfigError(f"{what} ({value}) must be divisible by --tensor-model-parallel-size "
                                  f"({tp}): each tensor-parallel rank holds an equal share")
        if m.num_layers % pp:
            raise ConfigError(f"--num-layers ({m.num_layers}) must be divisible by "
                              f"--pipeline-model-parallel-size ({pp})")
        if p.num_layers_per_virtual_pipeline_stage is not None:
            per = p.num_layers_per_virtual_pipeline_stage
            if pp < 2:
                raise ConfigError("--num-layers-per-virtual-pipeline-stage needs "
                                  "--pipeline-model-parallel-size of 2 or more")
            if per <= 0 or m.num_layers % (per * pp):
                raise ConfigError(
                    f"--num-layers ({m.num_layers}) must be divisible by --num-layers-per-virtual-"
                    f"pipeline-stage ({per}) x --pipeline-model-parallel-size ({pp})")
        if p.sequence_parallel and m.seq_length % tp:
            raise ConfigError(f"--sequence-parallel splits the sequence: --seq-length ({m.seq_length}) "
                              f"must be divisible by --tensor-model-parallel-size ({tp})")
        if p.recompute_num_layers <= 0:
            raise ConfigError(f"--recompute-num-layers must be positive, got {p.recompute_num_layers}")
        self._validate_sharding()

    def _validate_sharding(self) -> None:
        """--data-parallel-sharding-strategy against the flags it cannot work with."""
        p, strategy = self.parallel, self.parallel.sharding_strategy
        if p.use_distributed_optimizer and strategy == "no_shard":
            raise ConfigError("--use-distributed-optimizer shards the optimizer state, --data-parallel-sharding-"
                              "strategy no_shard shards nothing: drop one of the two")
        if p.optimizer_cpu_offload and strategy == "no_shard":
            raise ConfigError("--optimizer-cpu-offload moves the distributed optimizer's shard to the CPU: add "
                              "--use-distributed-optimizer (or a --data-parallel-sharding-strategy other than no_shard)")
        if strategy != "optim_grads_params":
            return
        for flag, on in (("--pipeline-model-parallel-size > 1", p.pipeline_model_parallel_size > 1),
                         ("--compile", self.train.compile)):
            if on:
                raise ConfigError(f"--data-parallel-sharding-strategy optim_grads_params (ZeRO-3) does not support "
                                  f"{flag}: use optim_grads (ZeRO-2) with it, or drop it")

    def _validate_moe(self) -> None:
        """Mixture-of-experts flags (the expert-parallel size against the world: at start-up)."""
        m, p = self.model, self.parallel
        ep = p.expert_model_parallel_size
        if ep <= 0:
            raise ConfigError(f"--expert-model-parallel-size must be positive, got {ep}")
        if not m.num_experts:
            if m.num_experts is not None:
                raise ConfigError(f"--num-experts must be positive, got {m.num_experts}")
            if ep > 1:
                raise ConfigError("--expert-model-parallel-size needs an MoE model (--num-experts)")
            return
        if not m.swiglu:
            raise ConfigError("--num-experts needs --swiglu: the experts are SwiGLU MLPs")
        if not 1 <= m.moe_router_topk <= m.num_experts:
            raise ConfigError(f"--moe-router-topk ({m.moe_router_topk}) must be between 1 and --num-experts "
                              f"({m.num_experts})")
        if m.num_experts % ep:
            raise ConfigError(f"--num-experts ({m.num_experts}) must be divisible by "
                              f"--expert-model-parallel-size ({ep}): each rank holds an equal share")
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_topk_scaling_factor",
                     "moe_expert_capacity_factor"):
            value = getattr(m, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if (m.moe_router_num_groups is None) != (m.moe_router_group_topk is None):
            raise ConfigError("--moe-router-num-groups and --moe-router-group-topk go together")
        if m.moe_router_num_groups is not None:
            g, gk, k, e = m.moe_router_num_groups, m.moe_router_group_topk, m.moe_router_topk, m.num_experts
            if g <= 0 or e % g:
                raise ConfigError(f"--moe-router-num-groups ({g}) must divide --num-experts ({e})")
            if not 1 <= gk <= g:
                raise ConfigError(f"--moe-router-group-topk ({gk}) must be between 1 and --moe-router-num-groups ({g})")
            if not gk <= k <= gk * (e // g):
                raise ConfigError(f"--moe-router-topk ({k}) must be between --moe-router-group-topk ({gk}) and the "
                                  f"experts of the kept groups ({gk} x {e // g})")
        if m.moe_router_bias_update_rate <= 0:
            raise ConfigError(f"--moe-router-bias-update-rate must be positive, got {m.moe_router_bias_update_rate}")
        if m.moe_aux_loss_coeff < 0 or m.moe_z_loss_coeff < 0:
            raise ConfigError("--moe-aux-loss-coeff and --moe-z-loss-coeff must not be negative")
        if m.moe_shared_expert_gate and not m.moe_shared_expert_intermediate_size:
            raise ConfigError("--moe-shared-expert-gate needs shared experts (--moe-shared-expert-intermediate-size)")
        if m.moe_pad_expert_input_to_capacity and m.moe_expert_capacity_factor is None:
            raise ConfigError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor: dropless "
                              "routing (no factor) has no capacity to pad to")
        freq = m.moe_layer_pattern
        if isinstance(freq, list):
            if len(freq) != m.num_layers:
                raise ConfigError(f"--moe-layer-freq gives a pattern of {len(freq)} layers; the model "
                                  f"has {m.num_layers} (--num-layers): give one 0 or 1 per layer")
        elif freq <= 0:
            raise ConfigError(f"--moe-layer-freq must be positive, got {freq}")
        if m.first_k_dense_replace < 0:
            raise ConfigError(f"--first-k-dense-replace must not be negative, got {m.first_k_dense_replace}")
        if not any(m.is_moe_layer(i) for i in range(m.num_layers)):
            raise ConfigError(f"--first-k-dense-replace ({m.first_k_dense_replace}) and --moe-layer-freq "
                              f"({m.moe_layer_freq}) leave no MoE layer among the {m.num_layers} layers")
        if m.moe_ffn_size % p.tensor_model_parallel_size:
            raise ConfigError(f"--moe-ffn-hidden-size ({m.moe_ffn_size}) must be divisible by "
                              f"--tensor-model-parallel-size ({p.tensor_model_parallel_size}): each expert is split "
                              "like the MLP")

    @property
    def virtual_pipeline_model_parallel_size(self) -> int:
        """Model chunks per pipeline rank (1 without the interleaved schedule)."""
        per = self.parallel.num_layers_per_virtual_pipeline_stage
        if per is None:
            return 1
        return self.model.num_layers // (per * self.parallel.pipeline_model_parallel_size)


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int = 1) -> int:
    """Megatron's padding: round the vocabulary up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)
