"""Checkpoint faults: each one reproduced, with the message a user reads and what is left on disk."""

import errno
import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

from megalm import checkpoint as ckpt
from megalm.checkpoint import files, lock
from tests.helpers import run, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLI = [sys.executable, "-u", "pretrain_gpt.py", "--mock-data", "--vocab-size", "256", "--num-layers", "2",
            "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32", "--log-interval", "1",
            "--eval-iters", "0"]


def snapshot(root: str) -> dict:
    """Every file under `root` and its bytes."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def flip_bytes_inside(path: str) -> None:
    """Change bytes in the middle of the file, keeping its size (the size check cannot see it)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(8)
        f.seek(size // 2)
        f.write(bytes(b ^ 0x5A for b in chunk))


def wait_for_line(proc, prefix: str, timeout: float = 120) -> list:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting with {prefix!r}:\n" + "".join(lines))


# ---------------------------------------------------------------------------------------- two runs, one dir

def test_a_second_run_saving_into_the_same_directory_is_refused(tmp_path):
    """Two runs saving into one directory would interleave their checkpoints; the second stops at
    start-up naming the first, which goes on and saves normally."""
    save = str(tmp_path / "ckpt")
    first = subprocess.Popen(TINY_CLI + ["--train-iters", "100000", "--save", save], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_line(first, "iter 2/")
        second = subprocess.run(TINY_CLI + ["--train-iters", "4", "--save", save], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"error: {save} is in use by another run (host {socket.gethostname()}, pid {first.pid}" in second.stderr
        assert "Give this run another --save directory" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output
    assert "saved checkpoint" in output
    assert not os.path.exists(os.path.join(save, lock.LOCK_NAME))  # released at exit


def write_lock(root: str, host: str, pid: int, age: float = 0.0) -> str:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, lock.LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "started": "earlier"}, f)
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_stale_locks_are_taken_over_and_live_ones_are_not(tmp_path):
    """kill -9 leaves the lock behind: a dead pid on this host, or a heartbeat that stopped long
    ago on another host, frees it; a live holder anywhere keeps it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root = str(tmp_path / "a")
        write_lock(root, socket.gethostname(), dead_pid)
        notes = []
        held = lock.SaveDirLock(root, log=notes.append).acquire()
        assert held.held and f"pid {dead_pid} (process {dead_pid} on this host no longer runs)" in notes[0]
        held.release()
        assert not os.path.exists(held.path)

        write_lock(root, socket.gethostname(), sleeper.pid)
        with pytest.raises(ckpt.CheckpointError, match=f"in use by another run .*pid {sleeper.pid}"):
            lock.SaveDirLock(root).acquire()
        write_lock(root, "node-17", 4242, age=10.0)
        with pytest.raises(ckpt.CheckpointError, match="host node-17, pid 4242"):
            lock.SaveDirLock(root).acquire()
        write_lock(root, "node-17", 4242, age=lock.STALE_SECONDS + 60)
        notes = []
        held = lock.SaveDirLock(root, log=notes.append).acquire()
        assert "heartbeat stopped" in notes[0]
        held.release()
    finally:
        sleeper.kill()


def test_the_lock_heartbeat_keeps_it_fresh(tmp_path):
    held = lock.SaveDirLock(str(tmp_path), heartbeat_seconds=0.05).acquire()
    try:
        os.utime(held.path, (time.time() - 1000, time.time() - 1000))
        deadline = time.time() + 30
        while time.time() - os.path.getmtime(held.path) > 100 and time.time() < deadline:
            time.sleep(0.05)
        assert time.time() - os.path.getmtime(held.path) < 100
    finally:
        held.release()


# ---------------------------------------------------------------------------------------- preemption

def test_sigterm_to_the_process_group_with_data_workers_saves(tmp_path):
    """A scheduler preempting a job signals its whole process group, DataLoader workers included; the
    workers leave the signal to the main process, which saves and exits cleanly."""
    save = str(tmp_path / "ckpt")
    proc = subprocess.Popen(TINY_CLI + ["--train-iters", "100000", "--save", save, "--num-workers", "2"], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        lines = wait_for_line(proc, "iter 3/")
        os.killpg(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "worker" not in output.lower() and "Traceback" not in output
    iteration = int(re.search(r"signal received: stopping at iteration (\d+) after saving", output).group(1))
    assert ckpt.find_checkpoint(save)["metadata"]["iteration"] == iteration


# ---------------------------------------------------------------------------------------- corrupt files

@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_flipped_bytes_are_caught_by_the_checksum(tmp_path, name):
    """Bytes changed on disk without changing the size loaded silently before (loss 317863 on
    resume); the checksum recorded at save names the file."""
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))
    meta = ckpt.read_metadata(ckpt.iteration_dir(save, 2))
    assert meta["checksums"]["algorithm"] == "xxh3_64"
    assert set(meta["checksums"]["files"]) == set(meta["files"])
    flip_bytes_inside(os.path.join(ckpt.iteration_dir(save, 2), name))
    with pytest.raises(ckpt.CheckpointError) as e:
        run(tiny_config("--train-iters", "4", "--load", save))
    assert f"iter_0000002/{name} is corrupt: its checksum does not match" in str(e.value)
    assert "--no-verify-checkpoint" in str(e.value)
    if name == "optimizer.pt":  # the pickle container is still readable: the flag skips the check
        assert run(tiny_config("--train-iters", "4", "--load", save, "--no-verify-checkpoint")).iteration == 4


def torchrun(*flags, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *TINY_CLI[2:], "--distributed-timeout-minutes", "2", *flags],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_a_shard_corrupt_on_one_rank_stops_every_rank_or_all_fall_back_together(tmp_path):
    """Each rank verifies only the shard it reads, so a flipped byte in tensor-parallel rank 1's
    weights fails there alone: every rank must stop (not wait in the next collective), and with
    --load-fallback every rank must resume from the same earlier checkpoint."""
    save = str(tmp_path / "ckpt")
    tp2 = ["--tensor-model-parallel-size", "2"]
    first = torchrun(*tp2, "--train-iters", "4", "--save", save, "--save-interval", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    flip_bytes_inside(os.path.join(ckpt.iteration_dir(save, 4), "mp_rank_01_000", "model.safetensors"))
    stopped = torchrun(*tp2, "--train-iters", "6", "--load", save)
    assert stopped.returncode != 0
    assert "error: rank 1: " in stopped.stderr  # printed by rank 0, with the failing rank named
    assert "mp_rank_01_000/model.safetensors is corrupt: its checksum does not match" in stopped.stderr
    fallback = torchrun(*tp2, "--train-iters", "6", "--load", save, "--save", save, "--load-fallback")
    assert fallback.returncode == 0, fallback.stdout[-2000:] + fallback.stderr[-3000:]
    assert f"resumed from {ckpt.iteration_dir(save, 2)} at iteration 2" in fallback.stdout
    assert re.search(r"^iter 6/6 ", fallback.stdout, re.M)


def test_metadata_without_its_file_list_is_named(tmp_path):
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))
    path = os.path.join(ckpt.iteration_dir(save, 2), "metadata.json")
    meta = json.load(open(path))
    del meta["files"]
    json.dump(meta, open(path, "w"))
    with pytest.raises(ckpt.CheckpointError, match="metadata.json lacks files: it was not written by megalm or was "
                                                    "edited by hand"):
        run(tiny_config("--train-iters", "4", "--load", save))


def test_an_unsafe_pickle_in_a_checkpoint_is_refused(tmp_path):
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))
    path = os.path.join(ckpt.iteration_dir(save, 2), "optimizer.pt")
    torch.save({"optimizer": socket.socket}, path)  # a class: unpickling it imports and calls code
    meta_path = os.path.join(ckpt.iteration_dir(save, 2), "metadata.json")
    meta = json.load(open(meta_path))
    meta["files"]["optimizer.pt"] = os.path.getsize(path)
    del meta["checksums"]["files"]["optimizer.pt"]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt holds pickled objects other than tensors"):
        ckpt.find_checkpoint(save)


def test_convert_checkpoint_refuses_an_unsafe_pickle_with_one_line(tmp_path):
    """A Hugging Face directory whose pytorch_model.bin holds arbitrary pickled objects."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                                                "num_hidden_layers": 1, "num_attention_heads": 2,
                                                "num_key_value_heads": 2, "max_position_embeddings": 32}))
    torch.save({"model.embed_tokens.weight": socket.socket}, str(hf / "pytorch_model.bin"))
    out = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--loader", "hf", "--saver", "megalm",
                          "--load-dir", str(hf), "--save-dir", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "pytorch_model.bin holds pickled objects other than tensors" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_a_changed_position_table_is_named_on_resume(tmp_path):
    """--max-position-embeddings sizes the learned position table: changing it on resume used to
    end in a size-mismatch traceback."""
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))
    with pytest.raises(ckpt.CheckpointError, match=r"learned position table \(--max-position-embeddings, default "
                                                   r"--seq-length\): checkpoint 32, this run 64"):
        run(tiny_config("--train-iters", "4", "--load", save, "--max-position-embeddings", "64"))
    out = subprocess.run(TINY_CLI + ["--train-iters", "4", "--load", save, "--max-position-embeddings", "64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "error: checkpoint" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------- --load

def test_load_without_a_checkpoint_is_an_error_unless_it_is_also_save(tmp_path):
    typo = str(tmp_path / "chekpoints")
    with pytest.raises(ckpt.CheckpointError, match=f"--load {re.escape(typo)} does not exist"):
        run(tiny_config("--train-iters", "2", "--load", typo))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="holds no checkpoint"):
        run(tiny_config("--train-iters", "2", "--load", str(empty)))
    out = io.StringIO()
    save = str(tmp_path / "run")
    state = run(tiny_config("--train-iters", "2", "--load", save, "--save", save), log_stream=out)
    assert state.iteration == 2 and "no checkpoint in" in out.getvalue() and "starting from scratch" in out.getvalue()
    cli = subprocess.run(TINY_CLI + ["--train-iters", "2", "--load", typo], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 2 and "error: --load" in cli.stderr


def test_load_takes_one_iteration_directory(tmp_path):
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "4", "--save", save, "--save-interval", "2"))
    out = io.StringIO()
    state = run(tiny_config("--train-iters", "6", "--load", ckpt.iteration_dir(save, 2)), log_stream=out)
    assert "resumed from" in out.getvalue() and "at iteration 2" in out.getvalue()
    assert state.iteration == 6


# ---------------------------------------------------------------------------------------- full disk

class _FullDisk:
    """open() whose files take `budget` bytes in all, then fail as a full disk does."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        disk, write = self, f.write

        def limited(data):
            if len(data) > disk.budget:
                raise OSError(errno.ENOSPC, "No space left on device")
            disk.budget -= len(data)
            return write(data)
        f.write = limited
        return f


def test_full_disk_while_saving_is_named_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))
    before = snapshot(save)
    monkeypatch.setattr(files, "open", _FullDisk(budget=4096), raising=False)
    with pytest.raises(ckpt.CheckpointError, match=r"no space left on device writing .*iter_0000004\.tmp/\S+ "
                                                   r"\(.* MiB free\): free some space"):
        run(tiny_config("--train-iters", "4", "--load", save, "--save", save))
    monkeypatch.undo()
    assert snapshot(save) == before  # no partial directory, the pointer unchanged
    assert ckpt.find_checkpoint(save)["metadata"]["iteration"] == 2


def test_full_disk_on_a_real_filesystem(tmp_path):
    """The same on a 2 MiB tmpfs: safetensors, torch.save and the metadata all meet a real ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root in a namespace that allows it")
    try:
        save = str(disk / "ckpt")
        config = tiny_config("--train-iters", "2", "--hidden-size", "128", "--save", save, "--save-interval", "1")
        with pytest.raises(ckpt.CheckpointError, match="no space left on device writing"):
            run(config)
        assert [n for n in os.listdir(save) if n.endswith(".tmp")] == []
        latest = ckpt.find_checkpoint(save)
        assert latest is None or latest["metadata"]["iteration"] == 1
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------- the rest

def test_leftovers_of_a_killed_save_are_cleaned_at_the_next_one(tmp_path):
    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))
    leftovers = [os.path.join(save, ckpt.TRACKER + ".tmp.99999"), os.path.join(save, "iter_0000003.tmp", "x")]
    for path in leftovers:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write("half")
    run(tiny_config("--train-iters", "4", "--load", save, "--save", save))
    assert sorted(os.listdir(save)) == sorted([ckpt.TRACKER, "iter_0000002", "iter_0000004"])


def test_skipped_iterations_carry_over_a_resume(tmp_path):
    save = str(tmp_path / "ckpt")
    flags = ["--fp16", "--initial-loss-scale", str(2.0 ** 120), "--hysteresis", "1", "--save", save]
    first = run(tiny_config("--train-iters", "3", *flags))
    assert first.skipped_iterations >= 1
    assert ckpt.find_checkpoint(save)["metadata"]["skipped_iterations"] == first.skipped_iterations
    second = run(tiny_config("--train-iters", "5", "--load", save, *flags))
    assert second.skipped_iterations >= first.skipped_iterations


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save = str(tmp_path / "ckpt")
        run(tiny_config("--train-iters", "1", "--save", save))
    finally:
        os.umask(old)
    for name in ("model.safetensors", "optimizer.pt", "metadata.json"):
        assert stat.S_IMODE(os.stat(os.path.join(ckpt.iteration_dir(save, 1), name)).st_mode) == 0o644, name


def test_no_checkpoint_is_written_while_steps_are_skipped(tmp_path):
    """A run whose gradients turn non-finite keeps its last good checkpoint: none is written while
    steps are skipped, and the divergence message names it and the last applied iteration."""
    from megalm.training.trainer import Trainer, TrainingError, gpt_forward_step

    save = str(tmp_path / "ckpt")
    run(tiny_config("--train-iters", "2", "--save", save))
    calls = []

    def nan_after_two_steps(batch, model):
        calls.append(1)
        loss = gpt_forward_step(batch, model)
        return loss if len(calls) <= 2 else loss * float("nan")

    import pretrain_gpt
    config = tiny_config("--train-iters", "30", "--save", save, "--load", save, "--save-interval", "1")
    out = io.StringIO()
    trainer = Trainer(config, pretrain_gpt.model_provider, pretrain_gpt.datasets_provider,
                      forward_step=nan_after_two_steps, log_stream=out)
    try:
        with pytest.raises(TrainingError) as e:
            trainer.train()
    finally:
        trainer.close()
    message = str(e.value)
    assert "inf/NaN for 10 iterations in a row (iterations 5 to 14" in message
    assert "the last step applied was iteration 4" in message
    assert f"The newest checkpoint, iteration 4 in {save}, was written before the skipping began" in message
    assert ckpt.list_checkpoints(save) == [4, 3, 2]
    assert "not saving at iteration 5" in out.getvalue()


def test_torchrun_errors_are_printed_once_and_reach_torchruns_summary(tmp_path):
    """Under torchrun a bad flag is met by every rank: rank 0 prints it once, and torchrun's failure
    summary shows it instead of "To enable traceback see ..."."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *TINY_CLI[2:], "--train-iters", "2",
                          "--tensor-model-parallel-size", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    message = "the world size (2 processes) must be divisible by --tensor-model-parallel-size (4)"
    printed = [line for line in text.splitlines() if line.startswith("error: ")]
    assert printed == [printed[0]] and message in printed[0], text  # one line, from rank 0
    assert f"traceback : error: {message}" in text  # torchrun's summary names the problem
    assert "To enable traceback" not in text

