"""The pre-training loop, shaped like Megatron-LM's `pretrain()`.

A training script supplies three functions and calls `pretrain`:

    model_provider(config) -> torch.nn.Module
    datasets_provider(config, num_samples: (train, valid, test)) -> (train, valid, test) datasets
    forward_step(batch, model) -> scalar loss (mean over the micro-batch's tokens)

One iteration is one optimizer step over the global batch: `num_microbatches` forward/backward
passes per data-parallel rank, each on `micro_batch_size` samples, with gradients accumulated
locally and averaged over ranks during the last backward pass. Samples are addressed by a single
counter, `consumed_samples`, so the data position of a resumed run is one integer.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from megalm.config import Config
from megalm.parallel import state as parallel_state
from megalm.parallel.data_parallel import DistributedDataParallel
from megalm.parallel.state import ParallelState
from megalm.training import checkpoint as ckpt
from megalm.training.metrics import MetricsLogger, Throughput, human, peak_flops, peak_memory_bytes
from megalm.training.optimizer import build_optimizer
from megalm.training.precision import autocast, build_loss_scaler, compute_dtype, unscale_and_clip
from megalm.training.schedule import LRScheduler

# Steps in a row whose gradients were not finite before the run is stopped (fp32/bf16, or fp16
# once the loss scale cannot go lower): the loss has diverged, and skipping will not recover it.
MAX_CONSECUTIVE_SKIPS = 10


class TrainingError(RuntimeError):
    """The run cannot continue (for example a diverged loss); the message says what to do."""


# ---------------------------------------------------------------------------------------- data

class PretrainingSampler:
    """Yields the sample indices of this rank's micro-batches, starting at `consumed_samples`.

    Each micro-step covers `micro_batch_size x dp_size` consecutive samples; rank r takes the r-th
    block of `micro_batch_size`. The union over ranks and micro-batches of one iteration is the
    same set of samples whatever the split, which is what makes data parallelism and gradient
    accumulation equivalent to one big batch.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list]:
        step = self.mbs * self.dp_size
        start = self.consumed
        while start + step <= self.total:
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += step

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.mbs * self.dp_size))


def _collate(samples: list) -> dict:
    tokens = torch.stack([torch.as_tensor(s["tokens"], dtype=torch.long) for s in samples])
    return {"tokens": tokens}


def build_data_iterator(dataset, consumed_samples: int, config: Config, state: ParallelState,
                        total_samples: Optional[int] = None) -> Iterator[dict]:
    total = len(dataset) if total_samples is None else min(total_samples, len(dataset))
    sampler = PretrainingSampler(total, consumed_samples, config.train.micro_batch_size,
                                 state.data_parallel_rank, state.data_parallel_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.data.num_workers, collate_fn=_collate,
        pin_memory=state.device.type == "cuda",
        # A private generator: creating a loader must not consume the global RNG, or a resumed
        # run's dropout masks would drift from the uninterrupted run's.
        generator=torch.Generator().manual_seed(config.train.seed))
    return iter(loader)


def split_batch(batch: dict, device: torch.device):
    """[b, s+1] tokens -> inputs [b, s] and next-token labels [b, s]."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def gpt_forward_step(batch: dict, model: torch.nn.Module) -> torch.Tensor:
    tokens, labels = split_batch(batch, next(model.parameters()).device)
    return model(tokens, labels)


# ---------------------------------------------------------------------------------------- state

@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    consecutive_skips: int = 0
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
        self.config = config
        self.state = state or parallel_state.initialize(config.train.device,
                                                        config.parallel.distributed_backend,
                                                        config.parallel.distributed_timeout_minutes)
        config.validate(self.state.data_parallel_size)
        t, st = config.train, self.state
        kwargs = {} if log_stream is None else {"stream": log_stream}
        self.log = MetricsLogger(st.is_main, t.tensorboard_dir, **kwargs)
        self.forward_step = forward_step
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * st.data_parallel_size)
        self.dtype = compute_dtype(t)

        seed_everything(t.seed)
        model = model_provider(config).to(st.device)
        self.model = model
        self.optimizer = build_optimizer(model, config.optim, st.device)
        self.scheduler = LRScheduler(self.optimizer, config.optim)
        self.scaler = build_loss_scaler(t, config.optim)
        self.train_state = TrainState()
        self._load()
        self.ddp = DistributedDataParallel(model, st.data_parallel_group, config.parallel.ddp_bucket_size,
                                           config.parallel.overlap_grad_reduce)
        if self.train_state.iteration == 0:
            self.ddp.broadcast_params()
        self.compiled = torch.compile(self.ddp) if t.compile else self.ddp

        # Every evaluation reads the same first eval_iters micro-batches of its split.
        eval_samples = t.eval_iters * t.micro_batch_size * st.data_parallel_size
        self.datasets = datasets_provider(config, (t.train_iters * t.global_batch_size, eval_samples,
                                                   eval_samples))
        self._describe()

    # -- set-up helpers

    def _load(self) -> None:
        t = self.config.train
        if not t.load:
            return
        found = ckpt.find_checkpoint(t.load, self.state.rank, fallback=t.load_fallback, log=self.log.print)
        if found is None:
            self.log.print(f"no checkpoint in {t.load}: starting from scratch")
            return
        meta = found["metadata"]
        ckpt.check_architecture(meta["config"], self.config, found["path"])
        missing, unexpected = self.model.load_state_dict(found["model"], strict=False)
        if missing or unexpected:
            raise ckpt.CheckpointError(f"{found['path']}/model.safetensors does not match the model: "
                                       f"missing {missing}, unexpected {unexpected}")
        if t.finetune:
            self.log.print(f"loaded weights from {found['path']} (finetune: iteration 0, fresh optimizer)")
            return
        if found["optimizer"] is None:
            raise ckpt.CheckpointError(f"{found['path']} holds model weights only (a converted or "
                                       f"exported checkpoint): start from it with --finetune")
        if not t.no_load_optim:
            self.optimizer.load_state_dict(found["optimizer"]["optimizer"])
            self.scaler.load_state_dict(found["optimizer"]["loss_scaler"])
        self.scheduler.load_state_dict(found["optimizer"]["scheduler"])
        if not t.no_load_rng:
            if found["rng"] is None:
                self.log.print(f"warning: {found['path']} has no RNG state for rank {self.state.rank} "
                               f"(saved with {meta['layout']['world_size']} ranks); RNG not restored")
            else:
                ckpt.set_rng_state(found["rng"])
        saved_mbs = meta["config"]["train"]["global_batch_size"]
        if saved_mbs != t.global_batch_size:
            self.log.print(f"note: global batch size changed from {saved_mbs} to {t.global_batch_size}")
        self.train_state.iteration = meta["iteration"]
        self.train_state.consumed_samples = meta["consumed_samples"]
        self.log.print(f"resumed from {found['path']} at iteration {meta['iteration']} "
                       f"({meta['consumed_samples']} samples consumed)")

    def _describe(self) -> None:
        c, st = self.config, self.state
        from megalm import kernels
        n = self.model.num_parameters() if hasattr(self.model, "num_parameters") else \
            sum(p.numel() for p in self.model.parameters())
        self.log.print(f"megalm: {human(n)} parameters | {st.world_size} process(es), data-parallel "
                       f"{st.data_parallel_size} | device {st.device} | dtype {str(self.dtype)[6:]} | "
                       f"global batch {c.train.global_batch_size} = micro {c.train.micro_batch_size} x "
                       f"accumulation {self.num_microbatches} x dp {st.data_parallel_size} | "
                       f"{c.train.train_iters} iterations")
        paths = kernels.describe(st.device, c.model)
        self.log.print("kernels: " + ", ".join(f"{op}={path}" for op, path in paths.items()))

    # -- one step

    def train_step(self, data: Iterator[dict]) -> tuple:
        """Forward/backward over the global batch and one optimizer step (or a skipped one)."""
        self.ddp.zero_grad_buffer()
        losses = []
        for micro in range(self.num_microbatches):
            batch = next(data)
            last = micro == self.num_microbatches - 1
            with (contextlib.nullcontext() if last else self.ddp.no_sync()):
                with autocast(self.state.device, self.dtype):
                    loss = self.forward_step(batch, self.compiled)
                (loss.float() * (self.scaler.scale / self.num_microbatches)).backward()
            losses.append(loss.detach().float())
        self.ddp.finish_grad_sync()
        lr = self.scheduler.step()
        grad_norm, found_inf = unscale_and_clip(self.model.parameters(), 1.0 / self.scaler.scale,
                                                self.config.optim.clip_grad)
        self.scaler.update(found_inf)
        if not found_inf:
            self.optimizer.step()
        return torch.stack(losses).mean(), grad_norm, found_inf, lr

    def _dp_mean(self, value: torch.Tensor) -> float:
        if self.state.distributed:
            value = value.clone()
            torch.distributed.all_reduce(value, group=self.state.data_parallel_group)
            value /= self.state.data_parallel_size
        return value.item()

    @torch.no_grad()
    def evaluate(self, dataset, name: str) -> Optional[float]:
        t = self.config.train
        if dataset is None or t.eval_iters <= 0:
            return None
        self.model.eval()
        data = build_data_iterator(dataset, 0, self.config, self.state,
                                   total_samples=t.eval_iters * t.micro_batch_size * self.state.data_parallel_size)
        total = torch.zeros((), device=self.state.device)
        count = 0
        for batch in data:
            with autocast(self.state.device, self.dtype):
                total += self.forward_step(batch, self.model).float()
            count += 1
        self.model.train()
        if count == 0:
            return None
        loss = self._dp_mean(total / count)
        it = self.train_state.iteration
        self.log.print(f"{name} at iteration {it} | loss {loss:.4f} | ppl {_ppl(loss):.2f}")
        self.log.scalars({f"{name}/loss": loss, f"{name}/ppl": _ppl(loss)}, it)
        return loss

    def save(self) -> None:
        t = self.config.train
        if not t.save:
            return
        start = time.perf_counter()
        path = ckpt.save_checkpoint(t.save, self.train_state.iteration, self.model, self.config,
                                    self.optimizer, self.scheduler, self.scaler,
                                    self.train_state.consumed_samples, self.state)
        self.log.print(f"saved checkpoint {path} in {time.perf_counter() - start:.1f}s")

    # -- the loop

    def train(self) -> TrainState:
        c, t, st, ts = self.config, self.config.train, self.state, self.train_state
        train_ds, valid_ds, test_ds = self.datasets
        data = build_data_iterator(train_ds, ts.consumed_samples, c, st)
        self.model.train()
        timer = Throughput(st.device)
        flops_per_token = self.model.flops_per_token() if hasattr(self.model, "flops_per_token") else None
        peak = peak_flops(st.device, self.dtype, t.peak_flops)
        tokens_per_iter = t.global_batch_size * c.model.seq_length
        loss_sum = torch.zeros((), device=st.device)
        loss_count, skipped_in_interval = 0, 0
        last_saved = ts.iteration if t.load else None
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
                    elapsed = timer.elapsed()
                    mean_loss = self._dp_mean(loss_sum / max(loss_count, 1)) if loss_count else float("nan")
                    tok_s = tokens_per_iter * timer.iterations / elapsed
                    values = {"train/loss": mean_loss, "train/ppl": _ppl(mean_loss), "train/lr": lr,
                              "train/grad_norm": grad_norm, "train/tokens_per_s": tok_s,
                              "train/skipped_iterations": ts.skipped_iterations,
                              "train/loss_scale": self.scaler.scale if t.fp16 else None,
                              "train/tokens": ts.consumed_samples * c.model.seq_length}
                    line = (f"iter {ts.iteration}/{t.train_iters} | tokens {human(values['train/tokens'])} | "
                            f"loss {mean_loss:.4f} | ppl {_ppl(mean_loss):.2f} | lr {lr:.3e} | "
                            f"grad norm {grad_norm:.3f} | skipped {skipped_in_interval} | "
                            f"{human(tok_s)} tok/s")
                    if flops_per_token:
                        tflops = flops_per_token * tok_s / st.world_size / 1e12
                        values["train/tflops_per_device"] = tflops
                        line += f" | {tflops:.2f} TFLOP/s/dev"
                        if peak:
                            values["train/mfu"] = tflops * 1e12 / peak
                            line += f" | MFU {100 * tflops * 1e12 / peak:.1f}%"
                    if t.fp16:
                        line += f" | loss scale {self.scaler.scale:.0f}"
                    mem = peak_memory_bytes(st.device)
                    values["train/peak_memory_gb"] = mem / 2**30
                    line += f" | mem {mem / 2**30:.2f} GB"
                    self.log.print(line)
                    self.log.scalars(values, ts.iteration)
                    ts.history.append((ts.iteration, mean_loss))
                    loss_sum.zero_()
                    loss_count, skipped_in_interval = 0, 0
                    timer.reset()

                if valid_ds is not None and ts.iteration % t.eval_interval == 0 and ts.iteration < t.train_iters:
                    self.evaluate(valid_ds, "validation")
                    timer.reset()
                want_exit = st.all_reduce_max(1.0 if exit_signal.received is not None else 0.0) > 0
                at_exit_interval = t.exit_interval is not None and ts.iteration % t.exit_interval == 0
                if t.save and ((t.save_interval and ts.iteration % t.save_interval == 0)
                               or want_exit or at_exit_interval):
                    self.save()
                    last_saved = ts.iteration
                    timer.reset()
                if want_exit or at_exit_interval:
                    reason = "signal received" if want_exit else f"--exit-interval {t.exit_interval}"
                    self.log.print(f"{reason}: stopping at iteration {ts.iteration}"
                                   + (f" after saving to {t.save}" if t.save else ""))
                    return ts
        if t.save and last_saved != ts.iteration:
            self.save()
        self.evaluate(valid_ds, "validation")
        self.evaluate(test_ds, "test")
        return ts

    def _check_divergence(self, loss: torch.Tensor) -> None:
        ts = self.train_state
        can_rescale = self.scaler.dynamic and self.scaler.scale > self.scaler.min_scale
        if ts.consecutive_skips >= MAX_CONSECUTIVE_SKIPS and not can_rescale:
            where = (f"; the last checkpoint in {self.config.train.save} is intact" if self.config.train.save
                     else "")
            raise TrainingError(
                f"gradients were inf/NaN for {ts.consecutive_skips} iterations in a row (up to "
                f"iteration {ts.iteration}, last loss {loss.item():.4g}): the run has diverged and "
                f"those steps were skipped, not applied{where}. Lower --lr, lengthen "
                f"--lr-warmup-iters, keep --clip-grad on, prefer --bf16 over --fp16, or check the "
                f"data for corrupt samples; then resume with --load.")

    def close(self) -> None:
        self.log.close()


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan")


def pretrain(config: Config, model_provider: Callable, datasets_provider: Callable,
             forward_step: Callable = gpt_forward_step) -> TrainState:
    """Build everything from `config`, train, evaluate, save. Returns the final TrainState."""
    trainer = Trainer(config, model_provider, datasets_provider, forward_step)
    try:
        return trainer.train()
    finally:
        trainer.close()
        parallel_state.destroy()
