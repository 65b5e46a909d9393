"""Expert parallelism (gloo on CPU, torchrun): EP=2 reproduces the single-process layer's outputs and
gradients, and a two-rank training run with EP=2 reproduces the one with EP=1."""

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.test_distributed import launch, losses  # noqa: E402


def _torchrun(nproc: int, *args) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_expert_layout_carves_expert_groups_out_of_data_parallel():
    from megalm.parallel.expert import expert_layout
    ep_groups, edp_groups, norm_groups = expert_layout([[0, 1, 2, 3]], 2)
    assert ep_groups == [[0, 1], [2, 3]] and edp_groups == [[0, 2], [1, 3]] and norm_groups == [[0, 1], [2, 3]]
    ep_groups, edp_groups, norm_groups = expert_layout([[0, 2, 4, 6], [1, 3, 5, 7]], 4)  # TP=2: two DP groups
    assert ep_groups == [[0, 2, 4, 6], [1, 3, 5, 7]] and edp_groups == [[0], [2], [4], [6], [1], [3], [5], [7]]
    assert norm_groups == [list(range(8))]
    # TP=2, PP=2, DP=4 on 16 ranks, EP=2: the data-parallel groups of (tensor t, stage p) are
    # t + 2 x (d + 4 p); the expert groups stay inside them, the norm groups take one block of each.
    dp_groups = [[t + 2 * (d + 4 * p) for d in range(4)] for p in range(2) for t in range(2)]
    ep_groups, edp_groups, norm_groups = expert_layout(dp_groups, 2)
    assert ep_groups[:2] == [[0, 2], [4, 6]] and edp_groups[:2] == [[0, 4], [2, 6]]
    assert norm_groups == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]


@pytest.mark.slow
def test_ep2_layer_matches_single_process_outputs_and_gradients():
    output = _torchrun(2, os.path.join("tests", "test_moe_parallel.py"))
    assert output.count("ep2 layer ok") == 2, output


def grad_norms(output: str) -> list:
    return [float(x) for x in re.findall(r"\| grad norm ([\d.]+) \|", output)]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,micro_batch", [(2, 2), (4, 1)])
def test_ep2_training_reproduces_ep1_loss(nproc, micro_batch):
    """2 ranks: one expert-parallel group; 4 ranks: two, with expert-data-parallel groups of 2. The
    small --clip-grad makes every step clip, so the global gradient norm must agree too."""
    flags = ["--micro-batch-size", str(micro_batch), "--swiglu", "--disable-bias-linear", "--num-experts", "4",
             "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "32",
             "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001", "--train-iters", "3",
             "--clip-grad", "0.05"]
    ep1 = launch(nproc, *flags)
    ep2 = launch(nproc, *flags, "--expert-model-parallel-size", "2")
    assert "moe aux" in ep2 and "expert-parallel 2" in ep2
    a, b = losses(ep1), losses(ep2)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5)
    for x, y in zip(grad_norms(ep1), grad_norms(ep2)):
        assert x == pytest.approx(y, rel=1e-4) and x > 0.05


def _worker() -> None:
    """Run under torchrun with 2 ranks: the EP=2 layer against the full layer on both ranks' tokens."""
    import torch.distributed as dist

    from megalm.model.moe import MoELayer
    from megalm.parallel.expert import build_expert_groups, expert_parameters
    from megalm.parallel.state import ParallelState
    from tests.test_moe import moe_config

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    state = ParallelState(rank=rank, world_size=2, backend="gloo", data_parallel_group=dist.group.WORLD,
                          expert_model_parallel_size=2)
    for kind, group in build_expert_groups(state, 2).items():
        setattr(state, kind, group)
    for capacity in (None, 1.0):
        config = moe_config(num_experts=4, moe_router_topk=2, moe_shared_expert_intermediate_size=16,
                            moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01, moe_expert_capacity_factor=capacity)
        torch.manual_seed(0)
        full = MoELayer(config, 0)
        torch.manual_seed(0)
        layer = MoELayer(config, 0, state)
        g = torch.Generator().manual_seed(1)
        x_all, dy_all = torch.randn(2, 1, 13, 32, generator=g), torch.randn(2, 1, 13, 32, generator=g)
        x_all[1, 0, :7] += 2.0  # rank 1's tokens route differently: uneven exchanges
        # Data parallel: the loss is the mean of the ranks' losses.
        y = layer(x_all[rank])
        ((y * dy_all[rank]).sum() + layer.aux_loss).div(2).backward()
        experts = {id(p) for p in expert_parameters(layer)}
        for p in layer.parameters():
            if id(p) not in experts:  # replicated: all-reduced over data parallel
                dist.all_reduce(p.grad)
        want = []
        for r in range(2):
            out = full(x_all[r])
            want.append(out)
            ((out * dy_all[r]).sum() + full.aux_loss).div(2).backward()
        torch.testing.assert_close(y, want[rank], atol=1e-5, rtol=1e-5)
        local = slice(2 * rank, 2 * rank + 2)
        for name, p in layer.named_parameters():
            ref = dict(full.named_parameters())[name].grad
            ref = ref[local] if id(p) in experts else ref
            torch.testing.assert_close(p.grad, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    print(f"rank {rank}: ep2 layer ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
