"""Small configurations and runs shared by the tests."""

import os

from megalm.arguments import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--mock-data", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "32", "--attention-dropout", "0",
        "--hidden-dropout", "0", "--log-interval", "1", "--eval-iters", "0", "--seed", "7"]


def tiny_config(*flags):
    """A validated Config for a tiny mock-data model; later flags override TINY's."""
    import pretrain_gpt
    config, _ = parse_args(TINY + list(flags))
    config.validate()
    pretrain_gpt.set_vocabulary(config)
    return config


def run(config, log_stream=None):
    """Train in this process; returns the TrainState (history = [(iteration, loss)])."""
    import io

    import pretrain_gpt
    from megalm.training.trainer import Trainer
    trainer = Trainer(config, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider,
                      log_stream=log_stream or io.StringIO())
    try:
        return trainer.train()
    finally:
        trainer.close()


def record_curves(config, model_provider, before=None, after=None) -> dict:
    """Train `config` in this process (under torchrun: in the launched process group): every step's
    loss and global gradient norm, plus the entries `before(trainer)` (built, not yet trained) and
    `after(trainer)` (trained) return."""
    import io

    import pretrain_gpt
    from megalm.training.trainer import Trainer

    norms = []

    class Recording(Trainer):
        def train_step(self, data):
            out = super().train_step(data)
            norms.append(out[1])
            return out

    trainer = Recording(config, model_provider, pretrain_gpt.datasets_provider, log_stream=io.StringIO())
    try:
        extra = before(trainer) if before else {}
        history = trainer.train().history
        extra.update(after(trainer) if after else {})
    finally:
        trainer.close()
    return {"loss": [loss for _, loss in history], "grad_norm": norms, **extra}


def launch_workers(script: str, nproc: int, runs: dict, out: str, timeout: int = 400) -> dict:
    """Start `torchrun` on the test file `script` (whose main is `worker_main`) with `nproc` ranks to
    run each of `runs` ({name: flags}); returns {name: result} as rank 0 wrote it to `out`."""
    import json
    import os
    import subprocess
    import sys
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, MEGALM_TEST_RUNS=json.dumps(runs), MEGALM_TEST_OUT=out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


def worker_main(train) -> None:
    """A torchrun worker started by `launch_workers`: `train(flags)` for each run in order, in one
    process group; rank 0 writes {name: result}."""
    import json
    import os

    import torch.distributed as dist
    results = {name: train(flags) for name, flags in json.loads(os.environ["MEGALM_TEST_RUNS"]).items()}
    if dist.get_rank() == 0:
        with open(os.environ["MEGALM_TEST_OUT"], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()
