#!/usr/bin/env python
"""Convert checkpoints between Hugging Face transformers and megalm.

    python tools/convert_checkpoint.py --loader hf --saver megalm --load-dir Llama-3.2-1B --save-dir ckpt
    python tools/convert_checkpoint.py --loader megalm --saver hf --load-dir ckpt --save-dir hf_out
    python tools/convert_checkpoint.py --loader megalm --saver megalm --load-dir ckpt_tp2_pp2 \
        --save-dir ckpt_tp1 --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1
    python tools/convert_checkpoint.py --loader megalm --saver megalm --load-dir ckpt_ep2 \
        --save-dir ckpt_ep1 --target-expert-model-parallel-size 1
    python tools/convert_checkpoint.py --loader megalm --saver peft --load-dir lora_ckpt --save-dir adapter
    python tools/convert_checkpoint.py --loader peft --saver megalm --load-dir adapter --base-dir ckpt \
        --save-dir lora_ckpt

Supported: LlamaForCausalLM (Llama 2 and 3, grouped-query attention, Llama 3 rope scaling),
MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel. A megalm checkpoint written here holds the
weights only: train from it with `pretrain_gpt.py --load ckpt --finetune`. The Hugging Face
directory written here loads with `AutoModelForCausalLM.from_pretrained` (and its tokenizer with
`AutoTokenizer.from_pretrained`). A megalm checkpoint of any tensor / pipeline / expert-parallel
layout is merged on export; megalm -> megalm reshards to the target layout (optimizer state included, so
training resumes). LoRA adapters travel as Hugging Face peft adapter directories (Llama, Mistral,
Qwen2). See docs/INTEROP.md and docs/PARALLELISM.md.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.checkpoint import CheckpointError  # noqa: E402
from megalm.convert import ARCHITECTURES, ConversionError, hf_to_megalm, megalm_to_hf  # noqa: E402
from megalm.convert.peft import megalm_to_peft, peft_to_megalm  # noqa: E402
from megalm.convert.reshard import reshard  # noqa: E402
from megalm.data.errors import DataError  # noqa: E402

FORMATS = ("hf", "megalm", "peft")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--loader", required=True, choices=FORMATS, help="Format of --load-dir.")
    parser.add_argument("--saver", required=True, choices=FORMATS, help="Format to write to --save-dir.")
    parser.add_argument("--load-dir", required=True, help="Checkpoint to read (megalm: the --save root or an "
                                                          "iter_XXXXXXX directory).")
    parser.add_argument("--save-dir", required=True, help="Directory to write; must not exist (see --force).")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1,
                        help="megalm saver: tensor-parallel size of the checkpoint written.")
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1,
                        help="megalm saver: pipeline-parallel size of the checkpoint written.")
    parser.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None,
                        help="megalm saver: layers per virtual stage, for the interleaved schedule.")
    parser.add_argument("--target-expert-model-parallel-size", type=int, default=1,
                        help="megalm saver: expert-parallel size of the checkpoint written (MoE models).")
    parser.add_argument("--force", action="store_true", help="Write into --save-dir even if it exists.")
    parser.add_argument("--max-shard-size", default="5GB", help="hf saver: largest safetensors shard.")
    parser.add_argument("--hf-architecture", choices=sorted(ARCHITECTURES),
                        help="hf saver: the model type to write (default: the one the checkpoint was imported "
                             "from, else the first that fits the model).")
    parser.add_argument("--base-dir", help="peft loader: the megalm checkpoint of the adapter's base model.")
    parser.add_argument("--peft-base-model", help="peft saver: base_model_name_or_path recorded in "
                                                  "adapter_config.json (the Hugging Face model the adapter loads onto).")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    layout = (args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
              args.target_num_layers_per_virtual_pipeline_stage, args.target_expert_model_parallel_size)
    try:
        if args.loader == args.saver == "hf":
            raise ConversionError("--loader and --saver are both hf: nothing to convert")
        if args.saver == "hf" and layout != (1, 1, None, 1):
            raise ConversionError("--target-*-parallel-size and --target-num-layers-per-virtual-pipeline-stage "
                                  "describe a megalm output; a Hugging Face checkpoint is never sharded by layer")
        if "peft" in (args.loader, args.saver) and {args.loader, args.saver} != {"peft", "megalm"}:
            raise ConversionError("peft adapters convert to and from megalm LoRA checkpoints: use --loader megalm "
                                  "--saver peft, or --loader peft --saver megalm")
        if "peft" in (args.loader, args.saver) and layout != (1, 1, None, 1):
            raise ConversionError("--target-*-parallel-size and --target-num-layers-per-virtual-pipeline-stage do not "
                                  "apply to peft conversions (a peft adapter or the imported checkpoint is whole)")
        if args.loader == "peft" and args.base_dir is None:
            raise ConversionError("--loader peft needs --base-dir: the megalm checkpoint of the adapter's base model")
        if args.saver == "peft":
            megalm_to_peft(args.load_dir, args.save_dir, force=args.force, base_model_name_or_path=args.peft_base_model)
        elif args.loader == "peft":
            peft_to_megalm(args.load_dir, args.base_dir, args.save_dir, force=args.force)
        elif args.loader == args.saver == "megalm":
            reshard(args.load_dir, args.save_dir, *layout, force=args.force)
        elif args.loader == "hf":
            hf_to_megalm(args.load_dir, args.save_dir, args.force, *layout)
        else:
            megalm_to_hf(args.load_dir, args.save_dir, force=args.force, architecture=args.hf_architecture,
                         max_shard_size=args.max_shard_size)
    except (ConversionError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
