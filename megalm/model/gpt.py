"""The GPT decoder: embedding -> transformer layers -> final norm -> output layer (and loss).

Pre-norm residual blocks as in GPT-2 / Llama / Megatron:

    x = x + dropout(attention(norm(x)))
    x = x + dropout(mlp(norm(x)))

Activations are batch-first, [b, s, h]. With labels the forward returns the mean cross-entropy over
the tokens whose label is not `ignore_index`; the output layer and the loss can be fused so that
the [tokens x vocab] logits never exist (`--cross-entropy-fusion`).

Packed sequences: `position_ids` [b, s] number each token inside its document (learned positions
or RoPE read them instead of 0 .. s-1) and `document_ids` [b, s] keep every layer's attention inside
a document, so each document gets the logits, loss and gradients it would get alone.

Model parallelism (`megalm.parallel`): given a `ParallelState`, the layers are split across
tensor-parallel ranks (heads, FFN, vocabulary; with sequence parallelism the residual stream is
[b, s / TP, h]), and a model built for pipeline rank p and virtual stage v holds only its layers:
the embedding on the first stage, the final norm and output layer on the last, the hidden states
in between coming from `set_input_tensor`. Layers keep their global numbers (`layers.5.` on
whichever stage holds layer 5), so the parameter names of a full model never change. Every part is
initialised from its own seed (drawn once from the global generator), so a stage or a
tensor-parallel shard starts from exactly the weights it holds in the full single-process model.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from megalm.config import ModelConfig
from megalm.kernels import cross_entropy, linear_cross_entropy
from megalm.model.attention import KVCache, SelfAttention
from megalm.model.init import normal_init
from megalm.model.mlp import MLP
from megalm.model.moe import AuxLossAutoScaler, MoELayer, moe_aux_loss
from megalm.model.norm import build_norm
from megalm.model.rope import RotaryEmbedding
from megalm.parallel import mappings
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from megalm.parallel.fp8 import layer_recipe
from megalm.parallel.random import checkpoint_context_fn
from megalm.parallel.state import ParallelState
from megalm.parallel.tensor import ColumnParallelLinear, VocabParallelEmbedding, mark_sequence_parallel, vocab_parallel_logits

IGNORE_INDEX = -100


@contextlib.contextmanager
def _init_seed(seed: int):
    """Initialise a part of the model from its own seed, leaving the global generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _SequenceParallelDropout:
    """Dropout on the residual stream: under sequence parallelism each tensor-parallel rank holds
    other tokens, so it draws its masks from the tracker's per-rank state."""

    def __init__(self, p: float, parallel: ParallelState):
        self.p = p
        self.tracker = parallel.rng_tracker if parallel.sequence_parallel else None

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if self.tracker is not None and training and self.p > 0:
            with self.tracker.fork():
                return F.dropout(x, self.p, training)
        return F.dropout(x, self.p, training)


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_number: int, parallel: Optional[ParallelState] = None):
        super().__init__()
        parallel = parallel or ParallelState()
        self.input_layernorm = build_norm(config)
        self.self_attention = SelfAttention(config, layer_number, parallel)
        self.pre_mlp_layernorm = build_norm(config)
        # A mixture of experts replaces the MLP in the layers --num-experts / --moe-layer-freq /
        # --first-k-dense-replace select (megalm.model.moe).
        if config.is_moe_layer(layer_number):
            self.mlp = MoELayer(config, layer_number, parallel)
        else:
            self.mlp = MLP(config, parallel, layer_recipe(config, layer_number))
        mark_sequence_parallel(self.input_layernorm, parallel)
        mark_sequence_parallel(self.pre_mlp_layernorm, parallel)
        self.hidden_dropout = config.hidden_dropout
        self.dropout = _SequenceParallelDropout(config.hidden_dropout, parallel)

    def forward(self, x: torch.Tensor, rotary=None, kv_cache: Optional[KVCache] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.self_attention(self.input_layernorm(x), rotary, kv_cache, document_ids)
        x = x + self.dropout(h, self.training)
        h = self.mlp(self.pre_mlp_layernorm(x))
        return x + self.dropout(h, self.training)


class LayerList(nn.ModuleList):
    """The transformer layers of a model or of one pipeline stage, registered under their global
    numbers (`layers.6.` on the stage that holds layers 6 and 7); indexing and iteration are local."""

    def __init__(self, layers: dict):
        super().__init__()
        for number, layer in layers.items():
            self.add_module(str(number), layer)

    def __getitem__(self, index):
        return list(self._modules.values())[index]


class GPTModel(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Optional[ParallelState] = None, virtual_stage: int = 0):
        super().__init__()
        if config.padded_vocab_size <= 0:
            raise ValueError("ModelConfig.padded_vocab_size must be set (see megalm.config.pad_vocab_size)")
        self.config = config
        self.parallel = parallel = parallel or ParallelState()
        self.pre_process = parallel.is_first_chunk(virtual_stage)
        self.post_process = parallel.is_last_chunk(virtual_stage)
        self.input_tensor: Optional[torch.Tensor] = None
        self.dropout = _SequenceParallelDropout(config.hidden_dropout, parallel)
        std = config.init_method_std
        # One draw from the global generator, the same on every rank; each part's seed derives from it.
        # (On the CPU generator even under a `torch.device("meta")` context, as converters build it.)
        seed = int(torch.randint(0, 2 ** 62, (), device="cpu"))
        self.embedding = self.position_embeddings = None
        if self.pre_process:
            with _init_seed(seed):
                self.embedding = VocabParallelEmbedding(config.padded_vocab_size, config.hidden_size,
                                                        normal_init(std), parallel)
        if config.position_embedding_type == "learned_absolute":
            if self.pre_process:
                with _init_seed(seed + 1):
                    self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
                    normal_init(std)(self.position_embeddings.weight)
                mark_sequence_parallel(self.position_embeddings, parallel)
            self.rotary = None
        else:
            self.position_embeddings = None
            self.rotary = RotaryEmbedding(
                config.head_dim, config.rotary_base, config.max_positions, config.rope_scaling_factor,
                config.rope_scaling_low_freq_factor, config.rope_scaling_high_freq_factor,
                config.rope_scaling_original_max_position)
        layers = {}
        for i in parallel.stage_layers(config.num_layers, virtual_stage):
            with _init_seed(seed + 2 + i):
                layers[i] = TransformerLayer(config, i, parallel)
        self.layers = LayerList(layers)
        self.final_layernorm = self.output_layer = None
        if self.post_process:
            self.final_layernorm = build_norm(config)
            mark_sequence_parallel(self.final_layernorm, parallel)
            tied = not config.untie_embeddings_and_output_weights
            if not tied or not self.pre_process:
                # Untied: the output layer's own weight. Tied on a last stage that is not also the
                # first: a copy of the embedding (same seed, same values), kept equal by summing
                # the two copies' gradients over the embedding group (megalm.parallel.data_parallel).
                with _init_seed(seed if tied else seed + 2 + config.num_layers):
                    self.output_layer = ColumnParallelLinear(config.hidden_size, config.padded_vocab_size,
                                                             bias=False, init_method=normal_init(std),
                                                             parallel=parallel)
                self.output_layer.weight.shared_embedding = tied
        if not config.untie_embeddings_and_output_weights and self.pre_process and not self.post_process:
            self.embedding.weight.shared_embedding = True

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.output_layer is None else self.output_layer.weight

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """The hidden states a pipeline stage after the first starts from (sent by the previous one)."""
        self.input_tensor = tensor

    def hidden_states(self, tokens: torch.Tensor, kv_cache: Optional[KVCache] = None,
                      position_ids: Optional[torch.Tensor] = None,
                      document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[b, s] token ids -> [b, s, h] final-normed hidden states.

        position_ids / document_ids [b, s]: packed sequences (see the module docstring). On a
        pipeline stage the layers start from the input tensor unless the stage holds the
        embedding, and the result is normed only on the last stage. With sequence parallelism the
        result is this rank's [b, s / TP, h].
        """
        b, s = tokens.shape
        self._check_packed_ids(tokens, kv_cache, position_ids, document_ids)
        offset = kv_cache.seq_len if kv_cache is not None else 0
        if offset + s > self.config.max_positions and self.position_embeddings is not None:
            raise ValueError(f"sequence of {offset + s} tokens is longer than the model's "
                             f"{self.config.max_positions} learned positions")
        x = self.embedding(tokens) if self.pre_process else self.input_tensor
        if kv_cache is not None and kv_cache.left_padding is not None:
            # Left-padded batch: each row counts its positions from its first real token.
            position_ids = kv_cache.position_ids(s)  # [b, s]
        rotary = None
        if self.position_embeddings is not None:
            ids = position_ids if position_ids is not None else torch.arange(offset, offset + s, device=tokens.device)
            x = x + self._position_embeddings(ids)
        elif self.rotary is not None:
            rotary = self.rotary(s, offset) if position_ids is None else self.rotary.at(position_ids)
        if self.pre_process:
            x = self.dropout(x, self.training)
        x = self._run_layers(x, rotary, kv_cache, document_ids)
        if kv_cache is not None:
            kv_cache.advance(s)
        return self.final_layernorm(x) if self.post_process else x

    def _check_packed_ids(self, tokens: torch.Tensor, kv_cache: Optional[KVCache], position_ids: Optional[torch.Tensor],
                          document_ids: Optional[torch.Tensor]) -> None:
        for name, ids in (("position_ids", position_ids), ("document_ids", document_ids)):
            if ids is None:
                continue
            if kv_cache is not None:
                raise ValueError(f"GPTModel: {name} describe packed training sequences; decoding with a KV cache "
                                 f"takes none (the cache numbers the positions)")
            if tuple(ids.shape) != tuple(tokens.shape) or ids.is_floating_point() or ids.dtype == torch.bool:
                raise ValueError(f"GPTModel: {name} must be integers shaped like tokens {tuple(tokens.shape)}, "
                                 f"got {ids.dtype} {tuple(ids.shape)}")
        if position_ids is not None and position_ids.numel():
            low, high = (int(v) for v in torch.aminmax(position_ids))
            if low < 0 or (self.position_embeddings is not None and high >= self.config.max_positions):
                bad = low if low < 0 else high
                raise ValueError(f"GPTModel: position id {bad} is outside [0, {self.config.max_positions}) "
                                 f"(the model's --max-position-embeddings)")

    def _position_embeddings(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Learned position embeddings of position_ids ([s] or [b, s]): [.., s, h], or this rank's
        [.., s / TP, h] slice under sequence parallelism."""
        if self.parallel.sequence_parallel:
            position_ids = position_ids.chunk(self.parallel.tensor_model_parallel_size, dim=-1)[
                self.parallel.tensor_model_parallel_rank]
        return self.position_embeddings(position_ids)

    def _run_layers(self, x: torch.Tensor, rotary, kv_cache: Optional[KVCache],
                    document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layers, with full activation recompute where `--recompute-granularity full` asks:
        a checkpointed group keeps only its input and runs its forward again during the backward."""
        p = self.parallel
        if p.recompute_granularity != "full" or kv_cache is not None or not torch.is_grad_enabled():
            for layer in self.layers:
                x = layer(x, rotary, kv_cache, document_ids)
            return x
        layers, n = list(self.layers), p.recompute_num_layers
        context_fn = checkpoint_context_fn(p.rng_tracker)

        def run(group):
            def forward(h, rotary, document_ids):
                for layer in group:
                    h = layer(h, rotary, document_ids=document_ids)
                return h
            return forward

        if p.recompute_method == "uniform":
            groups = [(layers[i:i + n], True) for i in range(0, len(layers), n)]
        else:  # block: the first n layers of the stage, one at a time; the rest keep activations
            groups = [([layer], i < n) for i, layer in enumerate(layers)]
        for group, recompute in groups:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(run(group), x, rotary, document_ids, use_reentrant=False,
                                                      context_fn=context_fn)
            else:
                x = run(group)(x, rotary, document_ids)
        return x

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, position_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Without labels: logits [b, s, V]. With labels [b, s]: the mean loss over the tokens whose
        label is not -100, plus the MoE auxiliary losses in training (`megalm.model.moe`). A pipeline
        stage before the last returns its hidden states [b, s, h]. position_ids / document_ids [b, s]
        describe packed sequences (module docstring); every pipeline stage needs them."""
        h = self.hidden_states(tokens, kv_cache, position_ids, document_ids)
        if not self.post_process:
            aux = moe_aux_loss(self)  # reaches the gradient through the backward of the activations
            return h if aux is None else AuxLossAutoScaler.apply(h, aux)
        tensor_parallel = self.parallel.tensor_model_parallel_size > 1
        if labels is None:
            return self._tensor_parallel_output(h, None) if tensor_parallel else vocab_parallel_logits(h, self.output_weight)
        if tensor_parallel:
            loss = self._tensor_parallel_output(h, labels)
        else:
            h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
            if self._fuse_cross_entropy(h):
                loss = linear_cross_entropy(h, self.output_weight, labels, ignore_index=IGNORE_INDEX)
            else:
                loss = cross_entropy(vocab_parallel_logits(h, self.output_weight), labels, ignore_index=IGNORE_INDEX)
        # MoE: the layers' load-balancing and z losses of this forward (training only) join the
        # loss, so they are averaged over micro-batches and data-parallel ranks as it is.
        aux = moe_aux_loss(self)
        return loss if aux is None else loss + aux

    def _tensor_parallel_output(self, h: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The output layer over this rank's vocabulary slice; the loss by vocab-parallel cross-entropy."""
        p = self.parallel
        group = p.tensor_model_parallel_group
        if p.sequence_parallel:
            h = mappings.gather_from_sequence_parallel_region(h, group)  # [b, s / TP, h] -> [b, s, h]
        else:
            h = mappings.copy_to_tensor_parallel_region(h, group)
        weight = self.output_weight  # [V / TP, h]
        if labels is None:
            return mappings.gather_from_tensor_parallel_region(vocab_parallel_logits(h, weight), group)
        h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        vocab_start = p.tensor_model_parallel_rank * weight.shape[0]
        if self._fuse_cross_entropy(h):
            return vocab_parallel_linear_cross_entropy(h, weight, labels, vocab_start, group, IGNORE_INDEX)
        return vocab_parallel_cross_entropy(vocab_parallel_logits(h, weight), labels, vocab_start, group,
                                            IGNORE_INDEX)

    def _fuse_cross_entropy(self, h: torch.Tensor) -> bool:
        mode = self.config.cross_entropy_fusion
        return mode == "fused" or (mode == "auto" and h.is_cuda)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.embedding is not None:
            n -= self.embedding.weight.numel()
            if self.position_embeddings is not None:
                n -= self.position_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_length: Optional[int] = None) -> float:
        """Training FLOPs per token of this model (`flops_per_token` below)."""
        return flops_per_token(self.config, seq_length)


def flops_per_token(c: ModelConfig, seq_length: Optional[int] = None) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per token, matmuls only.

    Per layer, forward: 2 h (q + 2 kv) d for the qkv projection, 2 nq d h for the output
    projection, 2 s nq d each for Q K^T and A V (the full s x s, as Megatron-LM and nanoGPT
    count it, so the MFU figures are comparable), and 2 h f (x3 with SwiGLU, x2 with GELU) for
    the MLP; plus 2 h V for the output layer. An MoE layer counts its router (2 h E), the k
    experts each token visits and the shared experts instead of the MLP.
    """
    s = seq_length or c.seq_length
    d, nq, g, h = c.head_dim, c.num_attention_heads, c.query_groups, c.hidden_size
    per_layer = (2 * h * (nq + 2 * g) * d + 2 * nq * d * h + 4 * s * nq * d
                 + 2 * h * c.ffn_size * (3 if c.swiglu else 2))
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_layers))
    if moe_layers:
        moe = 2 * h * (c.num_experts + 3 * c.moe_ffn_size * c.moe_router_topk
                       + 3 * (c.moe_shared_expert_intermediate_size or 0))
        per_layer_moe = moe - 2 * h * c.ffn_size * 3
        return 3.0 * (c.num_layers * per_layer + moe_layers * per_layer_moe + 2 * h * c.padded_vocab_size)
    return 3.0 * (c.num_layers * per_layer + 2 * h * c.padded_vocab_size)
