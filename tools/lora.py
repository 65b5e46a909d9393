#!/usr/bin/env python
"""LoRA checkpoints: fold the adapters into the base weights.

    python tools/lora.py merge --load lora_ckpt --save merged_ckpt

`merge` reads a LoRA or QLoRA checkpoint of any tensor / pipeline-parallel layout, adds s B A to
each adapted weight in fp32 (a QLoRA base is its de-quantized weights) and writes a plain
single-process megalm checkpoint (weights only, the LoRA settings removed from its config) that
pretrain_gpt.py --finetune, tools/generate.py and tools/convert_checkpoint.py read like any other.
To export the adapters themselves for Hugging Face peft, see tools/convert_checkpoint.py --saver peft.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.checkpoint import CheckpointError, meta_model, save_weights  # noqa: E402
from megalm.posttrain import lora  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="Fold the adapters into the base weights (fp32).")
    merge.add_argument("--load", required=True, help="LoRA checkpoint (a --save root or an iter_XXXXXXX directory).")
    merge.add_argument("--save", required=True, help="Directory of the merged checkpoint; must not exist (see --force).")
    merge.add_argument("--force", action="store_true", help="Write into --save even if it exists.")
    return parser.parse_args(argv)


def merge(load: str, save: str, force: bool = False) -> str:
    if os.path.exists(save) and not force:
        raise CheckpointError(f"output directory {save} exists; choose another or pass --force to overwrite it")
    found, config = lora.open_lora_checkpoint(load)
    weights = lora.merged_weights(found, config)
    record = found["metadata"].get("hf")
    plain = lora.without_lora(config)
    path = save_weights(save, plain, weights, {"hf": record} if record else None,
                        model=lora.task_head(meta_model(plain.model), plain))
    p = config.posttrain
    base = f" (its {p.lora_base_quantization} base de-quantized)" if p.lora_base_quantization else ""
    print(f"merged the rank-{p.lora_rank} adapters of {found['path']}{base} into {path}")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        merge(args.load, args.save, args.force)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
