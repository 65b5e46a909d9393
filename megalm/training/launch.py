"""How an entry script ends on an error the user can fix: one `error: ...` line, exit status 2.

Under torchrun every rank meets the same bad flag or missing file. Rank 0 prints the message;
every rank also writes it to torchrun's error file (TORCHELASTIC_ERROR_FILE), so that torchrun's
failure summary names the problem instead of "To enable traceback see ...". Without torchrun, the
process prints it."""

from __future__ import annotations

import json
import os
import sys
import time


def report_error(message: str) -> int:
    """Print `error: message` once per run and record it for torchrun; returns the exit status, 2."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": f"error: {message}", "timestamp": int(time.time())}, f)
        except OSError:  # the summary falls back to torchrun's own words
            pass
    if not error_file or os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    return 2
