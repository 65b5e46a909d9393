#!/usr/bin/env python
"""Tokenize supervised fine-tuning jsonl ahead of training and print what the run will see.

    python tools/preprocess_sft.py --data-path chat.jsonl --tokenizer-type HuggingFaceTokenizer \\
        --tokenizer-model hf_model/ --seq-length 2048 --packing

builds the cache that posttrain_gpt.py then reuses (same --data-path, tokenizer, chat template and
--data-cache-path), and prints per split: samples, rows, tokens, the fraction of them trained on,
truncated and dropped samples, and the packing efficiency (filled positions / row positions).
Formats, templates and loss masks: megalm/data/chat.py; caching and packing:
megalm/data/sft_dataset.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.data.cli import ArgumentParser, run  # noqa: E402


def parse_args(argv=None):
    from megalm.config import TOKENIZER_TYPES

    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--data-path", nargs="+", required=True, help="jsonl files of SFT samples.")
    group.add_argument("--split", default="969,30,1", help="Train/valid/test proportions.")
    group.add_argument("--data-cache-path", help="Where to cache the tokenized samples (default: a cache/ "
                       "directory next to each file).")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", help="tokenizer.json / tokenizer.model, or the directory holding it "
                       "(and its chat template).")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json.")
    group.add_argument("--merge-file", help="GPT-2 merges.txt.")
    group.add_argument("--vocab-size", type=int, help="Vocabulary size (NullTokenizer).")
    group.add_argument("--chat-template", help="A Jinja chat template file (default: the tokenizer "
                       "directory's, else megalm's ChatML).")
    group = parser.add_argument_group("rows")
    group.add_argument("--seq-length", type=int, required=True, help="Positions per row.")
    group.add_argument("--packing", action="store_true", help="Pack several samples into each row.")
    group.add_argument("--train-on-prompt", action="store_true", help="Also train on prompt / user tokens.")
    group.add_argument("--seed", type=int, default=1234, help="Row order seed.")
    group.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from megalm.config import DataConfig, PostTrainConfig
    from megalm.data.sft_dataset import build_sft_datasets

    args = parse_args(argv)
    data = DataConfig(data_path=args.data_path, split=args.split, data_cache_path=args.data_cache_path,
                      tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                      vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size)
    posttrain = PostTrainConfig(chat_template=args.chat_template, packing=args.packing,
                                train_on_prompt=args.train_on_prompt)
    datasets = build_sft_datasets(data, posttrain, args.seq_length, args.seed,
                                  progress=False if args.no_progress else None)
    for name, dataset in zip(("train", "valid", "test"), datasets):
        if dataset is None:
            print(f"{name}: no samples")
            continue
        stats = dataset.stats
        trained = dataset.loss_token_count() / max(stats["tokens"], 1)
        print(f"{name}: {stats['samples']:,} samples in {stats['rows']:,} rows of {args.seq_length}, "
              f"{stats['tokens']:,} tokens, {trained:.1%} trained on, {stats['truncated']:,} truncated, "
              f"{stats['dropped']:,} dropped, packing efficiency {stats['packing_efficiency']:.1%}")
    return 0


if __name__ == "__main__":
    run(main)
