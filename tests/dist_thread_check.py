"""Run under torchrun by tests/test_distributed.py with pretrain_gpt.py's flags: after `pretrain`
returns, no thread of the process groups (Gloo's workers and transport loop) may be left. One that
is can abort the process at exit ("terminate called without an active exception") after a run that
succeeded, when it drops a finished collective's tensors while the interpreter shuts down."""

import io
import os
import sys
import threading
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pretrain_gpt  # noqa: E402
from megalm.training.trainer import pretrain  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402


def native_threads() -> set:
    """Threads of this process that Python did not start (C++ workers)."""
    return set(map(int, os.listdir("/proc/self/task"))) - {t.native_id for t in threading.enumerate()}


if __name__ == "__main__":
    before = native_threads()
    with redirect_stdout(io.StringIO()):
        pretrain(tiny_config(*sys.argv[1:]), pretrain_gpt.model_provider, pretrain_gpt.datasets_provider)
    print(f"rank {os.environ['RANK']}: {len(native_threads() - before)} process-group threads left", flush=True)
