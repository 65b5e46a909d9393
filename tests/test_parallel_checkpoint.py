"""Sharded checkpoints: saved per tensor / pipeline rank, resharded, resumed on the same loss curve;
a checkpoint of another layout is refused with the command that reshards it."""

import io
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr

import pytest
import torch
from safetensors.torch import load_file

from megalm import checkpoint as ckpt
from megalm.convert.reshard import reshard
from tests.test_parallel_equivalence import BASE, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = BASE + ["--swiglu", "--train-iters", "6"]  # tied embeddings across stages, stacked SwiGLU fc1
TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]


def _losses(output: str) -> list:
    return [float(x) for x in re.findall(r"^iter \d+/\d+ \| tokens \S+ \| loss ([\d.]+)", output, re.M)]


@pytest.fixture(scope="module")
def saved_tp2_pp2(tmp_path_factory):
    """pretrain_gpt.py under torchrun at TP=2 x PP=2, stopped and saved at iteration 3 of 6."""
    save = str(tmp_path_factory.mktemp("ckpt") / "tp2_pp2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "pretrain_gpt.py",
           *FLAGS, *TP2_PP2, "--save", save, "--exit-interval", "3"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return save, _losses(out.stdout)


@pytest.fixture(scope="module")
def full_curve():
    return train(FLAGS)["loss"]


@pytest.mark.slow
def test_tp2_pp2_checkpoint_resharded_to_one_rank_resumes_the_same_curve(saved_tp2_pp2, full_curve, tmp_path):
    save, first = saved_tp2_pp2
    assert first == pytest.approx(full_curve[:3], abs=1e-4)  # the log prints 4 decimals
    meta = ckpt.find_checkpoint(save)["metadata"]
    assert meta["layout"]["sharded"] and meta["layout"]["tensor_model_parallel_size"] == 2
    shards = sorted(n for n in os.listdir(ckpt.iteration_dir(save, 3)) if n.startswith("mp_rank_"))
    assert shards == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    last_stage = load_file(os.path.join(ckpt.iteration_dir(save, 3), "mp_rank_00_001", "model.safetensors"))
    assert "layers.2.mlp.linear_fc1.weight" in last_stage and "layers.0.mlp.linear_fc1.weight" not in last_stage

    single = str(tmp_path / "tp1_pp1")
    reshard(save, single, target_tp=1, target_pp=1, log=lambda *_: None)
    resumed = train(FLAGS + ["--load", single])["loss"]
    assert resumed == pytest.approx(full_curve[3:], rel=2e-5)


@pytest.mark.slow
def test_reshard_round_trip_gives_back_every_shard(saved_tp2_pp2, tmp_path):
    save, _ = saved_tp2_pp2
    single, back = str(tmp_path / "one"), str(tmp_path / "back")
    reshard(save, single, 1, 1, log=lambda *_: None)
    reshard(single, back, 2, 2, log=lambda *_: None)
    for shard in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
        a = load_file(os.path.join(ckpt.iteration_dir(save, 3), shard, "model.safetensors"))
        b = load_file(os.path.join(ckpt.iteration_dir(back, 3), shard, "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), shard
        oa = torch.load(os.path.join(ckpt.iteration_dir(save, 3), shard, "optimizer.pt"), weights_only=True)
        ob = torch.load(os.path.join(ckpt.iteration_dir(back, 3), shard, "optimizer.pt"), weights_only=True)
        for name, state in oa["optimizer"]["state"].items():
            assert torch.equal(state["exp_avg_sq"], ob["optimizer"]["state"][name]["exp_avg_sq"]), name


@pytest.mark.slow
def test_loading_another_layout_says_how_to_reshard(saved_tp2_pp2):
    import pretrain_gpt
    save, _ = saved_tp2_pp2
    err = io.StringIO()
    with redirect_stderr(err):
        code = pretrain_gpt.main(FLAGS + ["--load", save])
    assert code == 2
    message = err.getvalue()
    assert "saved with TP=2, PP=2; this run uses TP=1, PP=1" in message
    assert ("tools/convert_checkpoint.py --loader megalm --saver megalm --load-dir " + save) in message
    assert "--target-tensor-parallel-size 1 --target-pipeline-parallel-size 1" in message
