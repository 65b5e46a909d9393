#!/usr/bin/env python
"""Post-train a GPT model: supervised fine-tuning (full, LoRA, QLoRA) and distillation.

    python posttrain_gpt.py --task sft --load BASE --save OUT --data-path chat.jsonl \\
        --lora-rank 16 --packing --micro-batch-size 4 --global-batch-size 32 --train-iters 500 --lr 2e-4

    python posttrain_gpt.py --task distill --load STUDENT --teacher-load TEACHER --save OUT \\
        --data-path chat.jsonl --kd-loss jsd --kd-beta 0.5 --kd-ratio 0.5 ...

    python posttrain_gpt.py --task grpo --load SFT --save OUT --data-path prompts.jsonl \\
        --reward-fn megalm.posttrain.rewards:exact_match_answer --num-generations 8 \\
        --max-completion-length 64 --micro-batch-size 16 --global-batch-size 64 ...

    torchrun --nproc-per-node 8 posttrain_gpt.py ...   # the parallel layouts of pretrain_gpt.py

`--load` is the model to start from (a megalm checkpoint, e.g. one imported from Hugging Face with
tools/convert_checkpoint.py): its architecture and tokenizer are this run's unless flags say
otherwise, its weights are loaded once, and training starts at iteration 0. When `--save` already
holds a checkpoint of this run, the run resumes from it instead (exactly: optimizer, data position,
random states). The data are jsonl files of chat, prompt-completion or plain-text samples
(`megalm.data.chat`); the loss is on assistant and completion tokens only. The same trainer as
pre-training runs the loop (`megalm.training.trainer.pretrain`): flags, logs, checkpoints and
parallelism are those of pretrain_gpt.py (see `--help`).
"""

import functools
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from megalm.arguments import COMMON_SECTIONS, parse_args
from megalm.checkpoint import CheckpointError
from megalm.config import Config, ConfigError, pad_vocab_size
from megalm.data.errors import DataError
from megalm.model import GPTModel
from megalm.parallel.state import ParallelState
from megalm.training.launch import report_error
from megalm.training.trainer import TrainingError, gpt_forward_step, model_inputs, pretrain

SECTIONS = COMMON_SECTIONS + ("posttrain",)
PREFERENCE_TASKS = ("dpo", "reward")  # trained on {"prompt", "chosen", "rejected"} pairs

def model_provider(config: Config, parallel: Optional[ParallelState] = None, virtual_stage: int = 0) -> GPTModel:
    """This rank's part of the model, with LoRA / QLoRA adapters when --lora-rank asks for them."""
    model = GPTModel(config.model, parallel, virtual_stage)
    if config.posttrain.lora_rank:
        from megalm.posttrain.lora import apply_lora, describe, trainable_parameters
        apply_lora(model, config.posttrain, parallel)
        for p in trainable_parameters(model):
            p.adapter = True  # absent from the base checkpoint (see Trainer._load_weights)
        if parallel is None or parallel.is_main:
            where = "" if parallel is None or not parallel.model_parallel else f" (rank 0's share, chunk {virtual_stage})"
            print(describe(model, config.posttrain) + where, flush=True)
    if config.posttrain.task == "reward" and model.post_process:
        from megalm.posttrain.heads import add_score_head
        add_score_head(model, config)
    return model


def datasets_provider(config: Config, num_samples):
    """(train, valid, test) rows of the jsonl samples: tokens, labels, position and document ids
    (grpo: the prompts, for training only)."""
    if config.posttrain.task == "grpo":
        from megalm.posttrain.grpo import build_prompt_dataset
        return build_prompt_dataset(config), None, None
    from megalm.data.preference_dataset import PREFERENCE
    from megalm.data.sft_dataset import SFT, build_sft_datasets
    kind = PREFERENCE if config.posttrain.task in PREFERENCE_TASKS else SFT
    datasets = build_sft_datasets(config.data, config.posttrain, config.model.seq_length, config.train.seed,
                                  num_samples=num_samples, kind=kind)
    if config.posttrain.teacher_logits:
        from megalm.posttrain.teacher_cache import with_teacher_logits
        datasets = with_teacher_logits(datasets, config.posttrain.teacher_logits)
    return datasets


class DistillStep:
    """(1 - ratio) CE + ratio x generalized JSD between the student's and the teacher's
    distributions over the tokens with a label (`megalm.posttrain.distill`). The teacher runs here
    on every micro-batch, or its top-k log-probabilities come with the batch (--teacher-logits)."""

    def __init__(self, config: Config):
        from megalm.posttrain.distill import kd_beta
        self.config, self.teacher = config, None
        p = config.posttrain
        self.ratio, self.beta, self.temperature = p.kd_ratio, kd_beta(p), p.kd_temperature

    def _teacher(self, device, dtype):
        if self.teacher is None:
            from megalm.posttrain.distill import load_teacher
            self.teacher = load_teacher(self.config.posttrain.teacher_load, self.config, device, dtype)
        return self.teacher

    def __call__(self, batch: dict, model: torch.nn.Module) -> torch.Tensor:
        from megalm.model.moe import moe_aux_loss
        from megalm.posttrain.distill import generalized_jsd, topk_generalized_jsd
        param = next(model.parameters())
        inputs = model_inputs(batch, param.device)
        labels = inputs.pop("labels")  # the models get the tokens and the position / document ids
        logits = model(**inputs)
        # Cross-entropy over the padded vocabulary, as --task sft computes it; the divergence over
        # the tokenizer's tokens only (the padding rows are no token, and the teacher's may differ).
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        logits = logits[..., :self.config.model.vocab_size or logits.shape[-1]]
        if "teacher_logprobs" in batch:
            kd = topk_generalized_jsd(logits, batch["teacher_logprobs"].to(param.device),
                                      batch["teacher_ids"].to(param.device), labels, self.beta, self.temperature)
        else:
            teacher = self._teacher(param.device, param.dtype)
            with torch.no_grad():
                teacher_logits = teacher(**inputs)
            kd = generalized_jsd(logits, teacher_logits, labels, self.beta, self.temperature)
        loss = (1.0 - self.ratio) * ce + self.ratio * kd
        aux = moe_aux_loss(getattr(model, "module", model))  # MoE students: their balancing losses too
        return loss if aux is None else loss + aux


def preference_run(config: Config, base: Optional[str]):
    """(model provider, datasets provider, forward step) of --task dpo / reward. `base` is the
    checkpoint training started from: the reference policy. With --precompute-ref-logps the
    reference log-probabilities of every pair are computed once the model is built, before training."""
    from megalm.posttrain.preference import DPOStep, RewardStep, precompute_reference_logprobs
    if config.posttrain.task == "reward":
        return model_provider, datasets_provider, RewardStep(config)
    step = DPOStep(config, config.posttrain.ref_load or base)
    if not config.posttrain.precompute_ref_logps:
        return model_provider, datasets_provider, step
    built = []

    def keeping_model(config, parallel=None, virtual_stage=0):
        built.append(model_provider(config, parallel, virtual_stage))
        return built[-1]

    def with_reference(config, num_samples):
        return tuple(None if d is None else precompute_reference_logprobs(d, step, built[0], config)
                     for d in datasets_provider(config, num_samples))
    return keeping_model, with_reference, step


def resume_or_start(config: Config, ns) -> None:
    """Point --load at this run's own newest checkpoint when --save has one (resume), else at the
    base model (weights only, iteration 0). The model flags not given, and the tokenizer when
    --tokenizer-type is not given, are those the checkpoint was trained with."""
    from megalm.checkpoint import checkpoint_dir, latest_iteration, read_metadata
    from megalm.checkpoint.merge import checkpoint_config
    t = config.train
    if t.save and os.path.isdir(t.save) and latest_iteration(t.save) is not None:
        t.load, t.finetune = t.save, False
    elif not t.load:
        raise ConfigError("posttrain_gpt.py starts from a trained model: give --load CKPT (a megalm checkpoint, e.g. "
                          "one imported with tools/convert_checkpoint.py), and --save DIR for the result")
    else:
        t.finetune = True
    if not os.path.isdir(t.load):
        raise ConfigError(f"--load {t.load}: no such checkpoint directory")
    path = checkpoint_dir(t.load)
    base = checkpoint_config({"metadata": read_metadata(path), "path": path})
    given = {key.split(".", 1)[1] for key in vars(ns) if key.startswith("model.")}
    for field, value in vars(base.model).items():
        if field not in given:
            setattr(config.model, field, value)
    if not any(key == "data.tokenizer_type" for key in vars(ns)):
        for name in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size"):
            setattr(config.data, name, getattr(base.data, name))


def set_vocabulary(config: Config) -> None:
    from megalm.data.tokenizer import vocabulary_size
    vocab_size = vocabulary_size(config.data)
    config.model.vocab_size = vocab_size
    config.model.padded_vocab_size = pad_vocab_size(vocab_size, config.model.make_vocab_size_divisible_by,
                                                    config.parallel.tensor_model_parallel_size)


def check_task(config: Config) -> None:
    p, par = config.posttrain, config.parallel
    if p.task == "distill" and par.pipeline_model_parallel_size > 1:
        raise ConfigError("--task distill computes the loss from the whole model's logits: it runs without "
                          "pipeline parallelism (--pipeline-model-parallel-size 1; use tensor or data parallelism)")
    if p.teacher_load and not os.path.isdir(p.teacher_load):
        raise ConfigError(f"--teacher-load {p.teacher_load}: no such checkpoint directory")
    if p.task in PREFERENCE_TASKS and par.pipeline_model_parallel_size > 1:
        raise ConfigError(f"--task {p.task} computes its loss from the whole model's output: it runs without "
                          f"pipeline parallelism (--pipeline-model-parallel-size 1; use tensor or data parallelism)")
    if p.ref_load and not os.path.isdir(p.ref_load):
        raise ConfigError(f"--ref-load {p.ref_load}: no such checkpoint directory")
    if p.task == "grpo":
        from megalm.posttrain.grpo import check_grpo
        check_grpo(config)


def configure(argv, description=None) -> tuple:
    """The run's validated config from the command line `argv`, and the starting model's path
    (--load as given: the reference policy's, also when the run resumes from --save)."""
    config, ns = parse_args(argv, description=description, sections=SECTIONS)
    base = config.train.load
    resume_or_start(config, ns)
    config.validate()
    check_task(config)
    set_vocabulary(config)
    return config, base


def main(argv=None) -> int:
    try:
        config, base = configure(argv, description=__doc__.split("\n\n")[0])
        if config.posttrain.task == "grpo":
            from megalm.posttrain.grpo import GRPOTrainer
            # The trainer makes its micro-batches (rollouts) and its loss.
            pretrain(config, model_provider, datasets_provider, trainer_class=functools.partial(
                GRPOTrainer, reference_path=base))
            return 0
        if config.posttrain.task in PREFERENCE_TASKS:
            pretrain(config, *preference_run(config, base))
            return 0
        # sft: the mean cross-entropy over the tokens with a label, as pre-training computes it
        step = gpt_forward_step if config.posttrain.task == "sft" else DistillStep(config)
        pretrain(config, model_provider, datasets_provider, step)
    except (ConfigError, CheckpointError, TrainingError, DataError, OSError, ValueError) as e:
        return report_error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
