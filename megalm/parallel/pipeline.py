"""Pipeline-parallel schedules: the micro-batches of one step through the stages, forward and back.

The model is cut by layers into PP stages, one per pipeline rank. A micro-batch's activations
[b, s, h] go point to point from stage to stage (`torch.distributed.batch_isend_irecv`; NCCL on GPUs,
gloo on CPU), and the gradients with respect to them come back the same way.

Schedules (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters"):

- no pipelining (PP=1): forward and backward of each micro-batch in turn;
- 1F1B (PipeDream-Flush): stage p runs PP - p - 1 warm-up forwards, then alternates one forward
  and one backward, then drains the remaining backwards. At most PP micro-batches' activations are
  alive on a stage, instead of all of them; the bubble is (PP - 1) / M of the step for M micro-batches;
- interleaved 1F1B: each rank holds VP model chunks (virtual stages v x PP + p), so a micro-batch
  visits every rank VP times and the bubble shrinks to (PP - 1) / (VP x M), for VP times more
  point-to-point traffic. It needs M to be a multiple of PP.

Micro-batch accounting is the same as without pipelining: every micro-batch's loss is scaled by
1 / M before its backward, so the accumulated gradient is the mean over the global batch. Data
parallelism is told to reduce gradients only during the last backward of each model chunk.

Messages between a pair of ranks are posted in one fixed order on both sides (activations before
gradients), which keeps them matched when the ring has two ranks and a pair exchanges both kinds.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megalm.parallel.state import ParallelState

# (chunk, micro-batch index, input activations or None) -> loss on the last stage, activations elsewhere
StepFn = Callable[[int, int, Optional[torch.Tensor]], torch.Tensor]
NoSyncFn = Callable[[int], contextlib.AbstractContextManager]


class _P2P:
    """Sends and receives between neighbouring stages (no-ops at the ends of the pipeline)."""

    def __init__(self, state: ParallelState, shape: Sequence[int], dtype: torch.dtype):
        self.state, self.shape, self.dtype = state, tuple(shape), dtype
        self.group = state.pipeline_model_parallel_group

    def communicate(self, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                    recv_prev: bool = False, recv_next: bool = False):
        st = self.state
        ops, from_prev, from_next = [], None, None
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.detach().to(self.dtype).contiguous(),
                                  st.next_pipeline_rank, self.group))
        if recv_prev:
            from_prev = torch.empty(self.shape, dtype=self.dtype, device=st.device)
            ops.append(dist.P2POp(dist.irecv, from_prev, st.prev_pipeline_rank, self.group))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.detach().to(self.dtype).contiguous(),
                                  st.prev_pipeline_rank, self.group))
        if recv_next:
            from_next = torch.empty(self.shape, dtype=self.dtype, device=st.device)
            ops.append(dist.P2POp(dist.irecv, from_next, st.next_pipeline_rank, self.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        if from_prev is not None:
            from_prev.requires_grad_()
        return from_prev, from_next

    # The stage-level helpers of 1F1B (the first stage receives no activations, the last no gradients).

    def recv_forward(self):
        return None if self.state.is_pipeline_first_stage else self.communicate(recv_prev=True)[0]

    def send_forward(self, y):
        if not self.state.is_pipeline_last_stage:
            self.communicate(send_next=y)

    def recv_backward(self):
        return None if self.state.is_pipeline_last_stage else self.communicate(recv_next=True)[1]

    def send_backward(self, grad):
        if not self.state.is_pipeline_first_stage:
            self.communicate(send_prev=grad)

    def send_forward_recv_backward(self, y):
        return None if self.state.is_pipeline_last_stage else self.communicate(send_next=y, recv_next=True)[1]

    def send_backward_recv_forward(self, grad):
        return None if self.state.is_pipeline_first_stage else self.communicate(send_prev=grad, recv_prev=True)[0]


class _Runner:
    """Forward and backward of one (chunk, micro-batch), with the bookkeeping the schedules share."""

    def __init__(self, step: StepFn, num_chunks: int, num_microbatches: int, grad_scale: float,
                 no_sync: NoSyncFn, state: ParallelState):
        self.step, self.num_microbatches, self.grad_scale = step, num_microbatches, grad_scale
        self.no_sync, self.state = no_sync, state
        self.forwards = [0] * num_chunks
        self.backwards = [0] * num_chunks
        self.losses: List[torch.Tensor] = []

    def forward(self, chunk: int, x: Optional[torch.Tensor]) -> torch.Tensor:
        y = self.step(chunk, self.forwards[chunk], x)
        self.forwards[chunk] += 1
        if self.state.is_last_chunk(chunk):
            self.losses.append(y.detach().float())
        return y

    def backward(self, chunk: int, x: Optional[torch.Tensor], y: torch.Tensor,
                 grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Backward from the loss (last stage) or from the gradient received for y; returns the
        gradient with respect to this stage's input. Data-parallel reduction runs only during a
        chunk's last micro-batch."""
        last = self.backwards[chunk] == self.num_microbatches - 1
        self.backwards[chunk] += 1
        with contextlib.nullcontext() if last else self.no_sync(chunk):
            if grad is None:
                (y.float() * self.grad_scale).backward()
            else:
                torch.autograd.backward(y, grad_tensors=grad.to(y.dtype))
        return None if x is None else x.grad


def forward_backward(step: StepFn, num_microbatches: int, state: ParallelState, tensor_shape: Sequence[int],
                     grad_scale: float, no_sync: NoSyncFn, dtype: torch.dtype = torch.float32,
                     forward_only: bool = False) -> List[torch.Tensor]:
    """Run one step's micro-batches through the schedule that fits `state`'s layout.

    `grad_scale` multiplies each micro-batch's loss before its backward (loss scale / M).
    Returns the detached micro-batch losses on the last pipeline stage, an empty list elsewhere.
    """
    vp = state.virtual_pipeline_model_parallel_size
    runner = _Runner(step, vp, num_microbatches, grad_scale, no_sync, state)
    if state.pipeline_model_parallel_size == 1:
        for _ in range(num_microbatches):
            y = runner.forward(0, None)
            if not forward_only:
                runner.backward(0, None, y, None)
        return runner.losses
    p2p = _P2P(state, tensor_shape, dtype)
    if vp == 1:
        _one_forward_one_backward(runner, p2p, num_microbatches, state, forward_only)
    else:
        _interleaved(runner, p2p, num_microbatches, state, forward_only)
    return runner.losses


def _one_forward_one_backward(run: _Runner, p2p: _P2P, m: int, state: ParallelState, forward_only: bool) -> None:
    pp, rank = state.pipeline_model_parallel_size, state.pipeline_model_parallel_rank
    warmup = m if forward_only else min(pp - rank - 1, m)
    remaining = m - warmup
    inputs, outputs = [], []

    for _ in range(warmup):
        x = p2p.recv_forward()
        y = run.forward(0, x)
        p2p.send_forward(y)
        if not forward_only:
            inputs.append(x)
            outputs.append(y)

    x = p2p.recv_forward() if remaining else None
    for i in range(remaining):
        last = i == remaining - 1
        y = run.forward(0, x)
        grad = p2p.send_forward_recv_backward(y)
        inputs.append(x)
        outputs.append(y)
        input_grad = run.backward(0, inputs.pop(0), outputs.pop(0), grad)
        if last:
            p2p.send_backward(input_grad)
        else:
            x = p2p.send_backward_recv_forward(input_grad)

    if not forward_only:
        for _ in range(warmup):
            grad = p2p.recv_backward()
            input_grad = run.backward(0, inputs.pop(0), outputs.pop(0), grad)
            p2p.send_backward(input_grad)


def _interleaved(run: _Runner, p2p: _P2P, m: int, state: ParallelState, forward_only: bool) -> None:
    """Megatron-LM's interleaved 1F1B: k counts (chunk, micro-batch) units; each group of PP x VP
    consecutive units runs PP micro-batches through chunk 0, then through chunk 1, and so on."""
    pp, rank = state.pipeline_model_parallel_size, state.pipeline_model_parallel_rank
    vp = state.virtual_pipeline_model_parallel_size
    total = m * vp
    all_warmup = False
    if forward_only:
        warmup = total
    elif m == pp:
        warmup, all_warmup = total, True
    else:
        warmup = min((pp - rank - 1) * 2 + (vp - 1) * pp, total)
    remaining = total - warmup
    first_rank, last_rank = state.is_pipeline_first_stage, state.is_pipeline_last_stage

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (pp * vp)) // pp
        return c if forward else vp - 1 - c

    inputs = [[] for _ in range(vp)]
    outputs = [[] for _ in range(vp)]
    output_grads = [[] for _ in range(vp)]

    def forward(k: int) -> torch.Tensor:
        c = chunk_of(k, True)
        if state.is_first_chunk(c) and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)
        y = run.forward(c, inputs[c][-1])
        outputs[c].append(y)
        if forward_only:
            inputs[c].pop()
            outputs[c].pop()
        return y

    def backward(k: int) -> Optional[torch.Tensor]:
        c = chunk_of(k, False)
        if state.is_last_chunk(c) and not output_grads[c]:
            output_grads[c].append(None)
        return run.backward(c, inputs[c].pop(0), outputs[c].pop(0), output_grads[c].pop(0))

    inputs[0].append(p2p.recv_forward())
    for k in range(warmup):
        y = forward(k)
        next_chunk = chunk_of(k + 1, True)
        recv_prev = not (first_rank and next_chunk == 0) and k != total - 1
        if state.is_last_chunk(chunk_of(k, True)):
            y = None
        if k == warmup - 1 and not forward_only and not all_warmup:
            x, grad = p2p.communicate(send_next=y, recv_prev=recv_prev, recv_next=not last_rank)
            output_grads[vp - 1].append(grad)
        else:
            x, _ = p2p.communicate(send_next=y, recv_prev=recv_prev)
        inputs[next_chunk].append(x)

    for k in range(remaining):
        forward_k = k + warmup
        y = forward(forward_k)
        input_grad = backward(k)
        if state.is_last_chunk(chunk_of(forward_k, True)):
            y = None
        if state.is_first_chunk(chunk_of(k, False)):
            input_grad = None
        # The first stage runs PP - 1 units ahead of the last one: look that far back.
        recv_prev = True
        if first_rank:
            next_forward_chunk = chunk_of(forward_k - (pp - 1), True)
            if next_forward_chunk == vp - 1:
                recv_prev = False
            next_forward_chunk += 1
        else:
            next_forward_chunk = chunk_of(forward_k + 1, True)
        recv_next = True
        if last_rank:
            next_backward_chunk = chunk_of(k - (pp - 1), False)
            if next_backward_chunk == 0:
                recv_next = False
            next_backward_chunk -= 1
        else:
            next_backward_chunk = chunk_of(k + 1, False)
        if k == remaining - 1:
            recv_prev = False
        x, grad = p2p.communicate(send_next=y, send_prev=input_grad, recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            inputs[next_forward_chunk].append(x)
        if recv_next:
            output_grads[next_backward_chunk].append(grad)

    if forward_only:
        return
    if all_warmup:
        output_grads[vp - 1].append(p2p.communicate(recv_next=not last_rank)[1])
    for k in range(remaining, total):
        input_grad = backward(k)
        if state.is_first_chunk(chunk_of(k, False)):
            input_grad = None
        next_chunk = chunk_of(k + 1, False)
        recv_next = not (last_rank and next_chunk == vp - 1) and k != total - 1
        _, grad = p2p.communicate(send_prev=input_grad, recv_next=recv_next)
        output_grads[next_chunk].append(grad)
