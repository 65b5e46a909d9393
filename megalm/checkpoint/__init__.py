"""The checkpoint format: the one place that reads and writes it (training, conversion, resharding
and inference all come through here).

Layout of `--save DIR`:

    DIR/megalm.lock                           held by the run saving here (megalm.checkpoint.lock)
    DIR/latest_checkpointed_iteration.txt     the iteration of the newest complete checkpoint
    DIR/iter_0000100/metadata.json            format version, iteration, consumed samples, config,
                                              parallel layout, byte size and checksum of every file
    DIR/iter_0000100/model.safetensors        model weights (no pickle)
    DIR/iter_0000100/optimizer.pt             optimizer, LR scheduler and loss-scaler state
    DIR/iter_0000100/rng/rank_00000.pt        python / numpy / torch / cuda RNG states of each rank
                                              (and its tensor-parallel RNG tracker's states)
    DIR/iter_0000100/tokenizer/               copies of the tokenizer files named by the config

A model-parallel run (tensor- or pipeline-parallel size above 1) writes one shard per
model-parallel rank instead of the two files at the top, as Megatron-LM does:

    DIR/iter_0000100/mp_rank_TT_PPP/model.safetensors    that rank's weights, full-model names
    DIR/iter_0000100/mp_rank_TT_PPP/optimizer.pt         that rank's optimizer state

With expert parallelism (size above 1) the shard directory also carries the expert-parallel rank,
`mp_rank_TT_PPP_EEE/` (Megatron-LM's name). Each holds that rank's whole state: the replicated
weights and its own E / EP experts of every MoE layer (`experts.weight1` [E / EP, 2 x ffn, h], the
experts numbered from EEE x E / EP), with their optimizer state. It is written by the first rank
of its expert-data-parallel group, so each expert shard is written once; the replicated weights
are stored EP times, as in Megatron-LM (the experts dominate an MoE model's size).

The metadata's `layout` records the tensor / pipeline / virtual-pipeline / expert-parallel sizes.
A checkpoint loads only into the same layout (the data-parallel size may change: optimizer states
are stored whole, keyed by parameter name); `tools/convert_checkpoint.py --loader megalm --saver
megalm --target-tensor-parallel-size N --target-pipeline-parallel-size M
--target-expert-model-parallel-size K` reshards it (`megalm.convert.reshard`).

Safety:
- A checkpoint is written under `iter_XXXXXXX.tmp`, renamed once every rank has finished, and only
  then does the `latest` pointer move (itself written to a temporary file and renamed), so a crash
  at any moment leaves the previous checkpoint usable; leftovers of a killed save are removed at
  the next one. A rank that cannot write (a full disk) stops every rank with the reason, and the
  partial directory is removed.
- Loading never unpickles arbitrary objects: weights come from safetensors and the rest through
  `torch.load(weights_only=True)`. Every file's size is checked when a checkpoint is opened, and
  the checksum of every file read (xxHash3-64, recorded at save) when it is read.
- One run per directory (`SaveDirLock`).
"""

from megalm.checkpoint.files import CheckpointError, save_safetensors
from megalm.checkpoint.format import (
    ARCHITECTURE_FIELDS,
    FORMAT_VERSION,
    METADATA,
    TRACKER,
    LayoutMismatchError,
    check_architecture,
    check_layout,
    checkpoint_dir,
    find_checkpoint,
    is_checkpoint_dir,
    iteration_dir,
    latest_iteration,
    layout_sizes,
    list_checkpoints,
    read_checkpoint,
    read_metadata,
    shard_dir,
    shard_rel,
)
from megalm.checkpoint.lock import SaveDirLock
from megalm.checkpoint.merge import (
    checkpoint_config,
    checkpoint_tokenizer,
    expert_names,
    merge,
    meta_chunks,
    meta_model,
    open_checkpoint,
    partition_specs,
)
from megalm.checkpoint.rng import rng_state, set_rng_state
from megalm.checkpoint.writer import CheckpointWriter, save_checkpoint, save_weights

__all__ = [
    "ARCHITECTURE_FIELDS", "FORMAT_VERSION", "METADATA", "TRACKER", "CheckpointError", "CheckpointWriter",
    "LayoutMismatchError", "SaveDirLock", "check_architecture", "check_layout", "checkpoint_config",
    "checkpoint_dir", "checkpoint_tokenizer", "expert_names", "find_checkpoint", "is_checkpoint_dir",
    "iteration_dir", "latest_iteration", "layout_sizes", "list_checkpoints", "merge", "meta_chunks",
    "meta_model", "open_checkpoint", "partition_specs", "read_checkpoint", "read_metadata", "rng_state",
    "save_checkpoint", "save_safetensors", "save_weights", "set_rng_state", "shard_dir", "shard_rel",
]
