#!/usr/bin/env python
"""Pre-train a GPT model.

    python pretrain_gpt.py --mock-data --tokenizer-type NullTokenizer --vocab-size 512 \\
        --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \\
        --micro-batch-size 8 --global-batch-size 32 --train-iters 200 --lr 1e-3

    torchrun --nproc-per-node 8 pretrain_gpt.py ...    # each process is a data-parallel rank
    torchrun --nproc-per-node 8 pretrain_gpt.py --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 ...           # tensor 2 x pipeline 2 x data 2

The three providers below are the whole recipe, as in Megatron-LM: a model, the datasets and the
forward step. `megalm.training.trainer.pretrain` does the rest (see `--help` for every flag).
"""

import sys
from typing import Optional

from megalm.arguments import parse_args
from megalm.checkpoint import CheckpointError
from megalm.config import Config, ConfigError, pad_vocab_size
from megalm.model import GPTModel
from megalm.parallel.state import ParallelState
from megalm.training.launch import report_error
from megalm.training.trainer import TrainingError, gpt_forward_step, pretrain


def model_provider(config: Config, parallel: Optional[ParallelState] = None, virtual_stage: int = 0) -> GPTModel:
    """This rank's part of the model: its tensor-parallel shard of pipeline chunk `virtual_stage`."""
    return GPTModel(config.model, parallel, virtual_stage)


def datasets_provider(config: Config, num_samples):
    """(train, valid, test) datasets of samples with seq_length + 1 tokens."""
    if config.data.mock_data:
        from megalm.data.mock import MockGPTDataset
        vocab = config.model.vocab_size or config.model.padded_vocab_size  # ids the tokenizer can produce
        # The three splits are distinct streams drawn from the same chain.
        return tuple(MockGPTDataset(vocab, config.model.seq_length, max(n, 1), config.train.seed,
                                    stream=split) if n > 0 else None
                     for split, n in enumerate(num_samples))
    from megalm.data import build_train_valid_test_datasets
    return build_train_valid_test_datasets(config.data, config.model.seq_length, num_samples,
                                           config.train.seed)


def set_vocabulary(config: Config) -> None:
    """Pad the tokenizer's vocabulary for the model (Megatron's --make-vocab-size-divisible-by)."""
    from megalm.data.tokenizer import vocabulary_size
    vocab_size = vocabulary_size(config.data)
    config.model.vocab_size = vocab_size
    config.model.padded_vocab_size = pad_vocab_size(vocab_size, config.model.make_vocab_size_divisible_by,
                                                    config.parallel.tensor_model_parallel_size)


def main(argv=None) -> int:
    try:
        config, _ = parse_args(argv, description=__doc__.split("\n\n")[0])
        config.validate()  # fail fast, before any process group or tokenizer exists
        set_vocabulary(config)
        pretrain(config, model_provider, datasets_provider, gpt_forward_step)
    except (ConfigError, CheckpointError, TrainingError, OSError, ValueError) as e:  # OSError: a path at fault
        return report_error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
