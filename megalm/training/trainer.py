"""The pre-training loop, shaped like Megatron-LM's `pretrain()`.

A training script supplies three functions and calls `pretrain`:

    model_provider(config, parallel_state, virtual_stage) -> torch.nn.Module
    datasets_provider(config, num_samples: (train, valid, test)) -> (train, valid, test) datasets
    forward_step(batch, model) -> scalar loss (mean over the micro-batch's tokens)

One iteration is one optimizer step over the global batch: `num_microbatches` forward/backward
passes per data-parallel rank, each on `micro_batch_size` samples, with gradients accumulated
locally and averaged over ranks during the last backward pass. Samples are addressed by a single
counter, `consumed_samples`, so the data position of a resumed run is one integer.

Model parallelism changes what one process holds, not the loop: the model provider builds this
rank's tensor-parallel shard of its pipeline stage (one model chunk per virtual stage), the
micro-batches go through the pipeline schedule of `megalm.parallel.pipeline`, the gradient norm is
global (`megalm.parallel.clip_grads`), and the last pipeline stage's loss is sent to rank 0 to be
logged. A provider that takes only `config` still works without model parallelism.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from megalm import checkpoint as ckpt
from megalm.checkpoint.ranks import first_failure, on_every_rank
from megalm.config import Config
from megalm.data.documents import document_split
from megalm.data.loader import pretraining_batches
from megalm.model.moe import AuxLossAutoScaler, moe_aux_loss, update_expert_bias
from megalm.parallel import pipeline
from megalm.parallel import state as parallel_state
from megalm.parallel.clip_grads import clip_grad_norm
from megalm.parallel.data_parallel import DistributedDataParallel, full_params, storage_bytes
from megalm.parallel.distributed_optimizer import build_parallel_optimizer
from megalm.parallel.fp8 import load_fp8_state, update_delayed_scaling
from megalm.parallel.random import model_parallel_seed
from megalm.parallel.state import ParallelState
from megalm.training.metrics import MetricsLogger, Throughput, duration, human, moe_log, moe_statistics, peak_flops, peak_memory_bytes
from megalm.training.optimizer import build_optimizer
from megalm.training.precision import autocast, build_loss_scaler, compute_dtype
from megalm.training.schedule import LRScheduler

# Steps in a row whose gradients were not finite before the run is stopped (fp32/bf16, or fp16
# once the loss scale cannot go lower): the loss has diverged, and skipping will not recover it.
MAX_CONSECUTIVE_SKIPS = 10


class TrainingError(RuntimeError):
    """The run cannot continue (for example a diverged loss); the message says what to do."""


# ---------------------------------------------------------------------------------------- data

def build_data_iterator(dataset, consumed_samples: int, config: Config, state: ParallelState,
                        total_samples: Optional[int] = None) -> Iterator[dict]:
    """This rank's micro-batches of `dataset` from sample `consumed_samples` (megalm.data.loader),
    split into documents at the end-of-document token where --reset-position-ids,
    --reset-attention-mask or --eod-mask-loss ask for it (megalm.data.documents)."""
    t, m = config.train, config.model
    batches = pretraining_batches(dataset, consumed_samples, t.micro_batch_size, state.data_parallel_rank,
                                  state.data_parallel_size, config.data.num_workers, t.seed,
                                  pin_memory=state.device.type == "cuda",
                                  vocab_size=m.vocab_size or m.padded_vocab_size, total_samples=total_samples)
    split = document_split(config.data)
    return batches if split is None else map(split, batches)


def split_batch(batch: dict, device: torch.device) -> tuple:
    """A micro-batch -> (tokens [b, s], labels [b, s]) on `device`.

    A pre-training batch {"tokens": [b, s + 1]} is shifted here (next-token labels). A batch with
    "labels" (post-training, or pre-training split into documents) is already shifted: its labels
    are used as given, -100 where a token has no loss."""
    if "labels" in batch:
        return batch["tokens"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)
    tokens = batch["tokens"].to(device, non_blocking=True)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The model's keyword arguments for a micro-batch: tokens and labels (`split_batch`), and the
    batch's position_ids / document_ids [b, s] where it has them (packed documents)."""
    tokens, labels = split_batch(batch, device)
    inputs = {"tokens": tokens, "labels": labels}
    inputs.update({key: batch[key].to(device, non_blocking=True)
                   for key in ("position_ids", "document_ids") if key in batch})
    return inputs


def gpt_forward_step(batch: dict, model: torch.nn.Module) -> torch.Tensor:
    """The micro-batch's loss. Every pipeline stage runs it on the whole batch: the stages after
    the first take the token shape and the position / document ids from it."""
    return model(**model_inputs(batch, next(model.parameters()).device))


# ---------------------------------------------------------------------------------------- state

@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0  # over the whole run, resumes included (saved in the checkpoint)
    consecutive_skips: int = 0
    last_saved: Optional[int] = None  # the iteration of the newest checkpoint in --save
    history: list = field(default_factory=list)  # (iteration, data-parallel mean loss) per log line


class _ExitSignal:
    """Turns the first SIGTERM/SIGINT into a request to save and stop at the next iteration."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------- loop

class Trainer:
    def __init__(self, config: Config, model_provider: Callable, datasets_provider: Callable,
                 forward_step: Callable = gpt_forward_step, state: Optional[ParallelState] = None,
                 log_stream=None):
        self.state = state or parallel_state.initialize(config)
        self.config = config = config.resolve(self.state.data_parallel_size)
        t, st = config.train, self.state
        kwargs = {} if log_stream is None else {"stream": log_stream}
        self.log = MetricsLogger(st.is_main, t.tensorboard_dir, **kwargs)
        self.save_lock = ckpt.SaveDirLock(t.save if st.is_main else None, log=self.log.print)
        on_every_rank(st, self.save_lock.acquire)
        try:
            self._build(model_provider, datasets_provider, forward_step)
        except BaseException:
            self.save_lock.release()
            raise

    def _build(self, model_provider: Callable, datasets_provider: Callable, forward_step: Callable) -> None:
        config, st = self.config, self.state
        t = config.train
        self.forward_step = forward_step
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * st.data_parallel_size)
        self.dtype = compute_dtype(t)

        seed_everything(t.seed)
        self.chunks = self._build_model(model_provider)
        self.model = self.chunks[0]
        # Dropout streams: per pipeline stage, and per tensor-parallel rank where tensors are split.
        model_parallel_seed(t.seed, st.rng_tracker, st.tensor_model_parallel_rank, st.tensor_model_parallel_size,
                            st.pipeline_model_parallel_rank, st.device.type)
        self.train_state = TrainState()
        found = self._load_weights()
        p = config.parallel
        self.ddps = [DistributedDataParallel(chunk, st, p.ddp_bucket_size, p.overlap_grad_reduce,
                                             sharding=p.sharding_strategy) for chunk in self.chunks]
        if found is None or t.finetune:  # a fresh start: every rank takes rank 0's weights
            for ddp in self.ddps:
                ddp.broadcast_params()
        make_optimizer = functools.partial(build_optimizer, config=config.optim, device=st.device)
        self.optimizer = build_parallel_optimizer(self.chunks, self.ddps, make_optimizer, st,
                                                  p.sharding_strategy != "no_shard", p.optimizer_cpu_offload)
        self.scheduler = LRScheduler(self.optimizer, config.optim)
        self.scaler = build_loss_scaler(t, config.optim)
        self._load_training_state(found)
        self.compiled = [torch.compile(ddp) if t.compile else ddp for ddp in self.ddps]

        # Every evaluation reads the same first eval_iters global batches of its split, so the
        # validation loss does not depend on the parallel layout.
        eval_samples = t.eval_iters * t.global_batch_size
        self.datasets = datasets_provider(config, (t.train_iters * t.global_batch_size, eval_samples,
                                                   eval_samples))
        self.flops_per_token = self.model.flops_per_token() if hasattr(self.model, "flops_per_token") else None
        self.peak_flops = peak_flops(st.device, self.dtype, t.peak_flops)
        self._describe()

    # -- set-up helpers

    def _build_model(self, model_provider: Callable) -> list:
        """This rank's model chunks (one per virtual pipeline stage), on the device."""
        st, c = self.state, self.config
        takes_state = len(inspect.signature(model_provider).parameters) >= 3
        if not takes_state:
            if st.model_parallel or c.parallel.recompute_granularity:
                raise TrainingError("model parallelism and activation recompute need a model provider "
                                    "with the signature model_provider(config, parallel_state, virtual_stage) "
                                    "(see pretrain_gpt.py)")
            return [model_provider(c).to(st.device)]
        chunks = []
        for v in range(st.virtual_pipeline_model_parallel_size):
            # Every chunk starts from the same generator state, as the whole model would: each part
            # then takes the initial weights it has in the single-process model.
            torch.manual_seed(c.train.seed)
            chunks.append(model_provider(c, st, v).to(st.device))
        return chunks

    def _load_weights(self) -> Optional[dict]:
        """The weights of --load's latest checkpoint into the model chunks; the checkpoint, or None."""
        t, st = self.config.train, self.state
        if not t.load:
            return None
        found = ckpt.find_checkpoint(t.load, st.rank, fallback=t.load_fallback, log=self.log.print,
                                     layout=st.layout(),
                                     model_parallel_rank=(st.tensor_model_parallel_rank, st.pipeline_model_parallel_rank,
                                                          st.expert_model_parallel_rank),
                                     verify=t.verify_checkpoint,
                                     first_failure=lambda message: first_failure(st, message))
        if found is None:
            if t.save and os.path.abspath(t.load) == os.path.abspath(t.save):
                self.log.print(f"no checkpoint in {t.load} yet: starting from scratch (it is also --save, so a "
                               f"restart of this command resumes from the checkpoints this run writes)")
                return None
            what = "does not exist" if not os.path.isdir(t.load) else "holds no checkpoint (no iter_XXXXXXX directory)"
            raise ckpt.CheckpointError(
                f"--load {t.load} {what}. Check the path (it is a --save directory or one of its iter_XXXXXXX "
                f"directories); to start from scratch leave out --load, or give the same directory to --load "
                f"and --save to resume automatically whenever a checkpoint exists")
        ckpt.check_architecture(found["metadata"]["config"], self.config, found["path"])
        weights, missing = dict(found["model"]), []
        for chunk in self.chunks:
            own = chunk.state_dict()
            # --finetune from a base model: parameters added for fine-tuning (LoRA adapters, marked
            # `adapter`) keep their initial values.
            new = {name for name, p in chunk.named_parameters() if getattr(p, "adapter", False)} if t.finetune else set()
            missing += [k for k in own if k not in weights and k not in new]
            chunk.load_state_dict({k: weights.pop(k) for k in own if k in weights}, strict=False)
        if missing or weights:
            raise ckpt.CheckpointError(f"{found['model_path']} does not match the model: "
                                       f"missing {missing}, unexpected {sorted(weights)}")
        return found

    def _load_training_state(self, found: Optional[dict]) -> None:
        """Optimizer, scheduler, loss scale, RNG and data position of a resumed run."""
        t = self.config.train
        if found is None:
            return
        meta = found["metadata"]
        if t.finetune:
            self.log.print(f"loaded weights from {found['path']} (finetune: iteration 0, fresh optimizer)")
            return
        if found["optimizer"] is None:
            raise ckpt.CheckpointError(f"{found['path']} holds model weights only (a converted or "
                                       f"exported checkpoint): start from it with --finetune")
        if not t.no_load_optim:
            self.optimizer.load_state_dict(found["optimizer"]["optimizer"])
            self.scaler.load_state_dict(found["optimizer"]["loss_scaler"])
            load_fp8_state(self.chunks, found["optimizer"].get("fp8", {}))
        self.scheduler.load_state_dict(found["optimizer"]["scheduler"])
        if not t.no_load_rng:
            if found["rng"] is None:
                self.log.print(f"warning: {found['path']} has no RNG state for rank {self.state.rank} "
                               f"(saved with {meta['layout']['world_size']} ranks); RNG not restored")
            else:
                ckpt.set_rng_state(found["rng"], self.state.rng_tracker)
        saved_mbs = meta["config"]["train"]["global_batch_size"]
        if saved_mbs != t.global_batch_size:
            self.log.print(f"note: global batch size changed from {saved_mbs} to {t.global_batch_size}")
        self.train_state.iteration = meta["iteration"]
        self.train_state.consumed_samples = meta["consumed_samples"]
        self.train_state.skipped_iterations = meta.get("skipped_iterations", 0)
        if t.save and os.path.abspath(t.save) == os.path.abspath(os.path.dirname(os.path.normpath(found["path"]))):
            self.train_state.last_saved = meta["iteration"]
        self.log.print(f"resumed from {found['path']} at iteration {meta['iteration']} "
                       f"({meta['consumed_samples']} samples consumed)")

    def _describe(self) -> None:
        c, st = self.config, self.state
        from megalm import kernels
        n = sum(p.numel() for chunk in self.chunks for p in chunk.parameters())
        trainable = sum(p.numel() for chunk in self.chunks for p in chunk.parameters() if p.requires_grad)
        where = "" if trainable == n else f" ({human(trainable)} trainable, {100 * trainable / max(n, 1):.2f}%)"
        where += "" if not st.model_parallel and st.expert_model_parallel_size == 1 else " on rank 0"
        layout = "" if not st.model_parallel else (
            f", tensor-parallel {st.tensor_model_parallel_size}, pipeline-parallel "
            f"{st.pipeline_model_parallel_size}" + (f" x {st.virtual_pipeline_model_parallel_size} virtual"
                                                   if st.virtual_pipeline_model_parallel_size > 1 else ""))
        if st.expert_model_parallel_size > 1:
            layout += f", expert-parallel {st.expert_model_parallel_size}"
        self.log.print(f"megalm: {human(n)} parameters{where} | {st.world_size} process(es), data-parallel "
                       f"{st.data_parallel_size}{layout} | device {st.device} | dtype {str(self.dtype)[6:]} | "
                       f"global batch {c.train.global_batch_size} = micro {c.train.micro_batch_size} x "
                       f"accumulation {self.num_microbatches} x dp {st.data_parallel_size} | "
                       f"{c.train.train_iters} iterations")
        self.log.print(self._memory_line())
        paths = kernels.describe(st.device, c.model)
        self.log.print("kernels: " + ", ".join(f"{op}={path}" for op, path in paths.items()))

    def _memory_line(self) -> str:
        """Model-state memory of this rank: weights, gradient buffers, optimizer moments (the latter
        allocated at the first step; a data-parallel share of them with the distributed optimizer)."""
        held = [ddp.state_tensors() for ddp in self.ddps]
        weights, grads = (storage_bytes([t for tensors in held for t in tensors[i]]) for i in (0, 1))
        moments = 1 if self.config.optim.optimizer == "lion" else 2
        updated = sum(p.numel() * p.element_size() for g in self.optimizer.param_groups for p in g["params"])
        p = self.config.parallel
        sharded = f" (sharded over data parallelism: {p.sharding_strategy})" if p.sharding_strategy != "no_shard" else ""
        sharded += " in CPU memory" if p.optimizer_cpu_offload else ""
        def size(n: float) -> str:
            return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"
        return (f"memory per rank (rank {self.state.rank}): weights {size(weights)} | gradients {size(grads)} | "
                f"optimizer state {size(moments * updated)}{sharded}")

    # -- one step

    def data_iterator(self, dataset, consumed_samples: int) -> Iterator[dict]:
        """The training micro-batches from sample `consumed_samples` on (a subclass may make them,
        as post-training's rollouts are)."""
        return build_data_iterator(dataset, consumed_samples, self.config, self.state)

    def train_step(self, data: Iterator[dict]) -> tuple:
        """Forward/backward over the global batch and one optimizer step (or a skipped one)."""
        for ddp in self.ddps:
            ddp.zero_grad_buffer()
        batches = [next(data) for _ in range(self.num_microbatches)]
        losses, stage_aux = self._forward_backward(batches, self.compiled, forward_only=False)
        for ddp in self.ddps:
            ddp.finish_grad_sync()
        lr = self.scheduler.step()
        grads, counted = self.optimizer.grads_for_clipping()
        grad_norm, found_inf = clip_grad_norm(grads, counted, 1.0 / self.scaler.scale, self.config.optim.clip_grad,
                                              self.optimizer.norm_group, self.state.device)
        self.scaler.update(found_inf)
        if not found_inf:
            self.optimizer.step()
        update_delayed_scaling(self.chunks, self.state)
        if self.config.model.moe_router_enable_expert_bias:
            # The expert biases follow the load of every step, skipped or not (Megatron-LM's order).
            update_expert_bias(self.chunks, self.state.data_parallel_group if self.state.distributed else None)
        # Only the last pipeline stage computes the loss; the others report the MoE aux losses of
        # their layers (0 without), which `_dp_mean` adds.
        loss = torch.stack(losses).mean() if losses else torch.zeros((), device=self.state.device)
        return loss + stage_aux / len(batches), grad_norm, found_inf, lr

    def _forward_backward(self, batches: list, models: list, forward_only: bool) -> tuple:
        """The micro-batches through the pipeline schedule (plain accumulation without pipelining):
        (the last stage's micro-batch losses, the sum of the other chunks' MoE aux losses)."""
        st, c = self.state, self.config
        # The MoE aux losses of the chunks before the last: their gradient comes from
        # AuxLossAutoScaler with the last stage's loss scale; their sum joins the logged loss.
        stage_aux = torch.zeros((), device=st.device)
        AuxLossAutoScaler.loss_scale = self.scaler.scale / len(batches)

        def step(chunk: int, micro: int, input_tensor: Optional[torch.Tensor]) -> torch.Tensor:
            nonlocal stage_aux
            if input_tensor is not None:
                self.chunks[chunk].set_input_tensor(input_tensor)
            with autocast(st.device, self.dtype):
                y = self.forward_step(batches[micro], models[chunk])
            aux = None if st.is_last_chunk(chunk) else moe_aux_loss(self.chunks[chunk])
            if aux is not None:
                stage_aux = stage_aux + aux.detach().float()
            return y

        seq = c.model.seq_length // (st.tensor_model_parallel_size if st.sequence_parallel else 1)
        losses = pipeline.forward_backward(
            step, len(batches), st, (c.train.micro_batch_size, seq, c.model.hidden_size),
            grad_scale=self.scaler.scale / len(batches), no_sync=lambda chunk: self.ddps[chunk].no_sync(),
            forward_only=forward_only)
        return losses, stage_aux

    def _dp_mean(self, value: torch.Tensor) -> float:
        """The data-parallel mean of a loss, known on every rank (summed over the pipeline stages:
        the last one's loss, the others' MoE aux losses or 0)."""
        st = self.state
        if st.distributed:
            value = value.clone()
            if st.data_parallel_size > 1:
                torch.distributed.all_reduce(value, group=st.data_parallel_group)
                value /= st.data_parallel_size
            if st.pipeline_model_parallel_size > 1:  # the loss of the last stage, the aux losses of the others
                torch.distributed.all_reduce(value, group=st.pipeline_model_parallel_group)
        return value.item()

    @torch.no_grad()
    def evaluate(self, dataset, name: str) -> Optional[float]:
        """The loss over the first --eval-iters global batches of `dataset`, the same samples and the
        same value (to rounding) whatever the data-, tensor- or pipeline-parallel layout."""
        t = self.config.train
        if dataset is None or t.eval_iters <= 0:
            return None
        for chunk in self.chunks:
            chunk.eval()
        data = build_data_iterator(dataset, 0, self.config, self.state, total_samples=t.eval_iters * t.global_batch_size)
        losses, counted = [], 0
        for _ in range(t.eval_iters):  # one global batch at a time, as a training step reads it
            batches = list(itertools.islice(data, self.num_microbatches))
            if len(batches) < self.num_microbatches:
                break
            losses += self._forward_backward(batches, self.chunks, forward_only=True)[0]
            counted += 1
        for chunk in self.chunks:
            chunk.train()
        if not counted:
            return None
        loss = self._dp_mean(torch.stack(losses).mean() if losses else torch.zeros((), device=self.state.device))
        it = self.train_state.iteration
        extra = self._step_metrics("eval")
        self.log.print(f"{name} at iteration {it} | loss {loss:.4f} | ppl {_ppl(loss):.2f}"
                       + "".join(f" | {key} {value:.4f}" for key, value in extra.items()))
        self.log.scalars({f"{name}/loss": loss, f"{name}/ppl": _ppl(loss),
                          **{f"{name}/{key}": value for key, value in extra.items()}}, it)
        return loss

    def _step_metrics(self, split: str) -> dict:
        """The forward step's own metrics ("train" or "eval") since it was last asked, over the
        data-parallel ranks: {name: value} from its `metrics(split, group)` where it has one (the
        rewards and accuracy of preference training), else none. Every rank calls it."""
        metrics = getattr(self.forward_step, "metrics", None)
        if metrics is None:
            return {}
        return metrics(split, self.state.data_parallel_group if self.state.distributed else None)

    def _diverging(self) -> bool:
        """Are the last steps skipped for non-finite gradients that loss scaling cannot explain?
        (fp16's dynamic scaler skips steps while it lowers the scale: that is its normal work.)"""
        can_rescale = self.scaler.dynamic and self.scaler.scale > self.scaler.min_scale
        return self.train_state.consecutive_skips > 0 and not can_rescale

    def save(self) -> bool:
        """Write a checkpoint of the current iteration, unless the run is diverging (see
        `_diverging`): its last good checkpoint must not be replaced. Returns whether it saved."""
        t, ts = self.config.train, self.train_state
        if not t.save:
            return False
        if self._diverging():
            last = f"iteration {ts.last_saved}" if ts.last_saved is not None else "none yet"
            self.log.print(f"not saving at iteration {ts.iteration}: its last {ts.consecutive_skips} step(s) were "
                           f"skipped for non-finite gradients; the newest checkpoint ({last}) is kept, and the save "
                           f"happens at the next applied step")
            return False
        start = time.perf_counter()
        with full_params(self.ddps):  # ZeRO-3: the whole weights, gathered for the writers
            path = ckpt.save_checkpoint(t.save, ts.iteration, self.chunks, self.config, self.optimizer,
                                        self.scheduler, self.scaler, ts.consumed_samples, self.state,
                                        extra_metadata={"skipped_iterations": ts.skipped_iterations})
        ts.last_saved = ts.iteration
        self.log.print(f"saved checkpoint {path} in {time.perf_counter() - start:.1f}s")
        return True

    # -- the loop

    def train(self) -> TrainState:
        t, st, ts = self.config.train, self.state, self.train_state
        train_ds, valid_ds, test_ds = self.datasets
        data = self.data_iterator(train_ds, ts.consumed_samples)
        for chunk in self.chunks:
            chunk.train()
        timer = Throughput(st.device)
        run_start, first_iteration = time.perf_counter(), ts.iteration
        loss_sum = torch.zeros((), device=st.device)
        loss_count, skipped_in_interval = 0, 0
        save_due = False  # a save that waits for a step that is applied
        with _ExitSignal() as exit_signal:
            while ts.iteration < t.train_iters:
                loss, grad_norm, found_inf, lr = self.train_step(data)
                ts.iteration += 1
                ts.consumed_samples += t.global_batch_size
                timer.iterations += 1
                if found_inf:
                    ts.skipped_iterations += 1
                    ts.consecutive_skips += 1
                    skipped_in_interval += 1
                    self._check_divergence(loss)
                else:
                    ts.consecutive_skips = 0
                    loss_sum += loss
                    loss_count += 1

                if ts.iteration % t.log_interval == 0 or ts.iteration == t.train_iters:
                    mean_loss = self._dp_mean(loss_sum / max(loss_count, 1)) if loss_count else float("nan")
                    elapsed = time.perf_counter() - run_start
                    eta = elapsed / (ts.iteration - first_iteration) * (t.train_iters - ts.iteration)
                    self._log_interval(timer, mean_loss, lr, grad_norm, skipped_in_interval, elapsed, eta)
                    loss_sum.zero_()
                    loss_count, skipped_in_interval = 0, 0
                    timer.reset()

                if valid_ds is not None and ts.iteration % t.eval_interval == 0 and ts.iteration < t.train_iters:
                    self.evaluate(valid_ds, "validation")
                    timer.reset()
                want_exit = st.all_reduce_max(1.0 if exit_signal.received is not None else 0.0) > 0
                at_exit_interval = t.exit_interval is not None and ts.iteration % t.exit_interval == 0
                save_due = save_due or bool(t.save_interval and ts.iteration % t.save_interval == 0)
                if t.save and (save_due or want_exit or at_exit_interval):
                    if self.save():
                        save_due = False
                    timer.reset()
                if want_exit or at_exit_interval:
                    reason = "signal received" if want_exit else f"--exit-interval {t.exit_interval}"
                    saved = ts.last_saved == ts.iteration
                    self.log.print(f"{reason}: stopping at iteration {ts.iteration}"
                                   + (f" after saving to {t.save}" if saved else ""))
                    return ts
        if t.save and ts.last_saved != ts.iteration:
            self.save()
        self.evaluate(valid_ds, "validation")
        self.evaluate(test_ds, "test")
        return ts

    def _log_interval(self, timer: Throughput, mean_loss: float, lr: float, grad_norm: float, skipped: int,
                      elapsed: float, eta: float) -> None:
        """The console line and TensorBoard scalars of one log interval."""
        c, t, st, ts = self.config, self.config.train, self.state, self.train_state
        tok_s = t.global_batch_size * c.model.seq_length * timer.iterations / timer.elapsed()
        values = {"train/loss": mean_loss, "train/ppl": _ppl(mean_loss), "train/lr": lr,
                  "train/grad_norm": grad_norm, "train/tokens_per_s": tok_s,
                  "train/skipped_iterations": ts.skipped_iterations,
                  "train/loss_scale": self.scaler.scale if t.fp16 else None,
                  "train/tokens": ts.consumed_samples * c.model.seq_length}
        line = (f"iter {ts.iteration}/{t.train_iters} | tokens {human(values['train/tokens'])} | "
                f"loss {mean_loss:.4f} | ppl {_ppl(mean_loss):.2f} | lr {lr:.3e} | "
                f"grad norm {grad_norm:.3f} | skipped {skipped} | {human(tok_s)} tok/s")
        if self.flops_per_token:
            tflops = self.flops_per_token * tok_s / st.world_size / 1e12
            values["train/tflops_per_device"] = tflops
            line += f" | {tflops:.2f} TFLOP/s/dev"
            if self.peak_flops:
                values["train/mfu"] = tflops * 1e12 / self.peak_flops
                line += f" | MFU {100 * tflops * 1e12 / self.peak_flops:.1f}%"
        if t.fp16:
            line += f" | loss scale {self.scaler.scale:.0f}"
        for key, value in self._step_metrics("train").items():
            values[f"train/{key}"] = value
            line += f" | {key} {value:.4f}"
        mem = peak_memory_bytes(st.device)
        values["train/peak_memory_gb"] = mem / 2**30
        line += f" | mem {mem / 2**30:.2f} GB | elapsed {duration(elapsed)} | ETA {duration(eta)}"
        moe = moe_statistics(self.chunks, st.data_parallel_group if st.distributed else None,
                             st.pipeline_model_parallel_group if st.pipeline_model_parallel_size > 1 else None)
        if moe is not None:  # expert load and router losses
            moe_line, moe_scalars = moe_log(moe)
            line += f" | {moe_line}"
            values.update(moe_scalars)
        self.log.print(line)
        self.log.scalars(values, ts.iteration)
        ts.history.append((ts.iteration, mean_loss))

    def _check_divergence(self, loss: torch.Tensor) -> None:
        ts, t = self.train_state, self.config.train
        if ts.consecutive_skips >= MAX_CONSECUTIVE_SKIPS and self._diverging():
            last_good = ts.iteration - ts.consecutive_skips
            if ts.last_saved is not None:
                where = (f" The newest checkpoint, iteration {ts.last_saved} in {t.save}, was written before the "
                         f"skipping began (none is written while steps are skipped); resume from it with --load, or "
                         f"from an earlier one if the loss was already rising there.")
            else:
                where = " No checkpoint of this run was written before the skipping began."
            raise TrainingError(
                f"gradients were inf/NaN for {ts.consecutive_skips} iterations in a row (iterations "
                f"{last_good + 1} to {ts.iteration}, last loss {loss.item():.4g}; the last step applied was iteration "
                f"{last_good}): the run has diverged, and those steps were skipped, not applied.{where} Lower "
                f"--lr, lengthen --lr-warmup-iters, keep --clip-grad on, prefer --bf16 over --fp16, or check the "
                f"data for corrupt samples.")

    def close(self) -> None:
        self.log.close()
        self.save_lock.release()
        for ddp in self.ddps:
            ddp.close()


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan")


def pretrain(config: Config, model_provider: Callable, datasets_provider: Callable,
             forward_step: Callable = gpt_forward_step, trainer_class: type = Trainer) -> TrainState:
    """Build everything from `config`, train, evaluate, save. Returns the final TrainState.
    `trainer_class`: Trainer or a subclass (one with its own micro-batches or logs)."""
    trainer = None
    try:
        trainer = trainer_class(config, model_provider, datasets_provider, forward_step)
        return trainer.train()
    except BaseException as e:
        # The traceback's frames would keep the trainer, and with it the process groups, alive
        # until the interpreter exits (see `parallel_state.destroy`).
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None
        parallel_state.destroy()
