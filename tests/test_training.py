"""The training loop: accumulation, exact resume, schedules, precision, checkpoints, divergence."""

import io
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from megalm import checkpoint as ckpt
from megalm.config import OptimConfig
from megalm.data import DataError
from megalm.training.precision import DynamicLossScaler
from megalm.training.schedule import LRScheduler
from megalm.training.trainer import Trainer, TrainingError, build_data_iterator
from tests.helpers import run, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(state):
    return [loss for _, loss in state.history]


def test_loss_falls_on_mock_data():
    state = run(tiny_config("--train-iters", "40", "--micro-batch-size", "8", "--lr", "3e-3"))
    curve = losses(state)
    assert curve[0] == pytest.approx(math.log(256), abs=0.15)
    assert curve[-1] < curve[0] - 0.5


def test_micro_batch_4_equals_2_x_2_accumulation():
    a = run(tiny_config("--train-iters", "5", "--micro-batch-size", "4", "--global-batch-size", "4"))
    b = run(tiny_config("--train-iters", "5", "--micro-batch-size", "2", "--global-batch-size", "4"))
    assert len(losses(a)) == 5
    for x, y in zip(losses(a), losses(b)):
        assert x == pytest.approx(y, rel=1e-5)


def test_interrupted_and_resumed_run_continues_the_same_loss_curve(tmp_path):
    # Dropout on, so the RNG state must be restored too.
    flags = ["--train-iters", "8", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--lr-warmup-iters", "2"]
    full = losses(run(tiny_config(*flags)))
    save = str(tmp_path / "ckpt")
    first = run(tiny_config(*flags, "--save", save, "--exit-interval", "3"))
    assert losses(first) == full[:3]
    assert open(os.path.join(save, ckpt.TRACKER)).read() == "3"
    second = run(tiny_config(*flags, "--save", save, "--load", save))
    assert losses(second) == full[3:]  # bitwise: fp32 on CPU is deterministic


def test_checkpoint_contents_load_without_pickle(tmp_path):
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))
    found = ckpt.find_checkpoint(save)
    meta = found["metadata"]
    assert meta["iteration"] == 2 and meta["consumed_samples"] == 2 * 4
    assert meta["config"]["model"]["hidden_size"] == 32
    assert set(found["optimizer"]) == {"optimizer", "scheduler", "loss_scaler"}
    assert found["rng"] is not None
    assert "embedding.weight" in found["model"]
    assert not [n for n in os.listdir(save) if n.endswith(".tmp")]


def test_corrupt_checkpoint_is_named_and_fallback_is_opt_in(tmp_path):
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "4", "--save", save, "--save-interval", "2"))
    weights = os.path.join(ckpt.iteration_dir(save, 4), "model.safetensors")
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ckpt.CheckpointError) as e:
        run(tiny_config("--train-iters", "6", "--load", save))
    assert "iter_0000004/model.safetensors is corrupt" in str(e.value)
    assert "--load-fallback" in str(e.value)
    out = io.StringIO()
    state = run(tiny_config("--train-iters", "6", "--load", save, "--load-fallback"), log_stream=out)
    assert "skipping unreadable checkpoint" in out.getvalue()
    assert "resumed from" in out.getvalue() and "iter_0000002" in out.getvalue()
    assert state.iteration == 6


def test_truncated_checkpoint_is_reported(tmp_path):
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))
    path = os.path.join(ckpt.iteration_dir(save, 2), "optimizer.pt")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt is truncated or corrupt"):
        ckpt.find_checkpoint(save)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))
    with pytest.raises(ckpt.CheckpointError, match="hidden_size: checkpoint 32, this run 64"):
        run(tiny_config("--train-iters", "4", "--load", save, "--hidden-size", "64"))


def test_weights_only_checkpoint_needs_finetune(tmp_path):
    save = str(tmp_path / "ckpt")
    config = tiny_config("--train-iters", "2")
    import pretrain_gpt
    ckpt.save_checkpoint(save, 0, pretrain_gpt.model_provider(config), config)
    with pytest.raises(ckpt.CheckpointError, match="--finetune"):
        run(tiny_config("--train-iters", "2", "--load", save))
    assert run(tiny_config("--train-iters", "2", "--load", save, "--finetune")).iteration == 2


@pytest.mark.parametrize("style, expected", [
    ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.25, 0.5, 0.75, 1.0, 0.8875, 0.6625, 0.1]),
    ("cosine", [0.25, 0.5, 0.75, 1.0, 0.9658, 0.7222, 0.1]),
    ("WSD", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1]),
])
def test_learning_rate_schedule_values(style, expected):
    config = OptimConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=4, lr_decay_style=style, lr_decay_iters=12,
                         lr_wsd_decay_iters=4)
    scheduler = LRScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0), config)
    at = [0, 1, 2, 3, 5, 7, 12]
    assert [round(scheduler.get_lr(i), 4) for i in at] == pytest.approx(expected, abs=1e-4)
    # WSD decays linearly over its last 4 iterations: 8 -> 12.
    if style == "WSD":
        assert scheduler.get_lr(10) == pytest.approx(0.1 + 0.9 * 0.5)


def test_dynamic_loss_scaler_halves_on_overflow_and_grows_after_window():
    scaler = DynamicLossScaler(initial_scale=1024, min_scale=1, window=3, hysteresis=2)
    scaler.update(found_inf=True)
    assert scaler.scale == 1024  # hysteresis absorbs the first overflow
    scaler.update(found_inf=True)
    assert scaler.scale == 512
    for _ in range(3):
        scaler.update(found_inf=False)
    assert scaler.scale == 1024


def test_fp16_overflow_is_skipped_and_the_scale_drops():
    config = tiny_config("--train-iters", "6", "--fp16", "--initial-loss-scale", str(2.0 ** 120),
                         "--hysteresis", "1")
    out = io.StringIO()
    import pretrain_gpt
    trainer = Trainer(config, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider, log_stream=out)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step(build_data_iterator(trainer.datasets[0], 0, config, trainer.state))
    # 2^120 x loss overflows fp32: the step is skipped, the weights are untouched, the scale halves.
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert trainer.scaler.scale == 2.0 ** 119
    state = trainer.train()
    assert state.skipped_iterations >= 1
    assert "loss scale" in out.getvalue()


def test_diverged_run_stops_with_advice_and_keeps_checkpoints(tmp_path):
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))

    def nan_after_start(batch, model):
        from megalm.training.trainer import gpt_forward_step
        return gpt_forward_step(batch, model) * float("nan")

    import pretrain_gpt
    config = tiny_config("--train-iters", "30", "--save", save, "--load", save, "--save-interval", "1")
    trainer = Trainer(config, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider,
                      forward_step=nan_after_start, log_stream=io.StringIO())
    with pytest.raises(TrainingError, match="inf/NaN for 10 iterations in a row.*Lower --lr"):
        trainer.train()
    assert trainer.train_state.skipped_iterations == 10
    # No save happened while the steps were skipped: the newest checkpoint is the good one.
    found = ckpt.find_checkpoint(save)
    assert found["metadata"]["iteration"] == 2
    assert all(torch.isfinite(t).all() for t in found["model"].values())


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run(tiny_config("--train-iters", "3", "--tensorboard-dir", str(tmp_path)))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert tag in tags
    assert len(acc.Scalars("train/loss")) == 3


def test_sigterm_saves_before_exit(tmp_path):
    save = str(tmp_path / "ckpt")
    cmd = [sys.executable, "-u", "pretrain_gpt.py", "--mock-data", "--vocab-size", "256", "--num-layers", "2",
           "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32", "--train-iters", "100000",
           "--log-interval", "1", "--eval-iters", "0", "--save", save]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("iter 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "signal received: stopping at iteration" in output
    iteration = int(re.search(r"stopping at iteration (\d+)", output).group(1))
    assert open(os.path.join(save, ckpt.TRACKER)).read() == str(iteration)


def test_token_id_beyond_the_vocabulary_stops_with_the_fix(tmp_path):
    """Data tokenized with a larger vocabulary than the run's: the first batch holding such an id
    stops training with a message naming the id, the vocabulary and the flags to fix, before the
    embedding lookup (a device-side assert on a GPU)."""
    import numpy as np

    from megalm.data.indexed_dataset import IndexedDatasetBuilder
    prefix = str(tmp_path / "wide")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for _ in range(40):
            doc = rng.integers(0, 200, size=60)
            doc[rng.integers(0, 60)] = 300  # one id per document beyond 256
            builder.add_document(doc)
        builder.finalize()
    config = tiny_config("--train-iters", "4", "--micro-batch-size", "2")
    config.data.mock_data, config.data.data_path = False, [prefix]
    config.data.tokenizer_type, config.data.split = "NullTokenizer", "100,0,0"
    with pytest.raises(DataError, match=r"holds token id 300, but the tokenizer's vocabulary has 256 entries"):
        run(config)


def test_token_id_in_the_vocabulary_padding_is_refused(tmp_path):
    """An id between the tokenizer's vocabulary (250) and the padded one (256) has an embedding row
    but no token: it is refused like any other id the tokenizer cannot produce."""
    import numpy as np

    from megalm.data.indexed_dataset import IndexedDatasetBuilder
    prefix = str(tmp_path / "padding")
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for i in range(40):
            builder.add_document(np.full(60, 252 if i == 3 else 7))
        builder.finalize()
    config = tiny_config("--train-iters", "4", "--micro-batch-size", "2", "--vocab-size", "250")
    assert (config.model.vocab_size, config.model.padded_vocab_size) == (250, 256)
    config.data.mock_data, config.data.data_path = False, [prefix]
    config.data.tokenizer_type, config.data.split = "NullTokenizer", "100,0,0"
    with pytest.raises(DataError, match=r"holds token id 252, but the tokenizer's vocabulary has 250 entries"):
        run(config)


def test_mock_data_with_a_real_tokenizer_draws_ids_the_tokenizer_has(tmp_path):
    """--mock-data with a tokenizer and no --vocab-size: the synthetic ids stay within the tokenizer's
    300 tokens (the padded 384 would be refused by the token-id check)."""
    from tests.test_convert import write_tokenizer
    write_tokenizer(str(tmp_path / "tok"), vocab_size=300)
    config = tiny_config("--train-iters", "3", "--tokenizer-type", "HuggingFaceTokenizer",
                         "--tokenizer-model", str(tmp_path / "tok" / "tokenizer.json"))
    config.data.vocab_size = None
    import pretrain_gpt
    pretrain_gpt.set_vocabulary(config)
    assert (config.model.vocab_size, config.model.padded_vocab_size) == (300, 384)
    assert run(config).iteration == 3
