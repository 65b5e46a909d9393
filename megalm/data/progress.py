"""One progress bar for the data tools: bytes read (MB/s) plus documents/s and, when counted,
tokens/s. Shown on a terminal only (tqdm's rule), so logs stay clean."""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence


def total_bytes(paths: Sequence[str]) -> Optional[int]:
    """Sizes of plain inputs; None when a compressed / columnar file makes the size meaningless."""
    if any(p.endswith((".gz", ".parquet")) for p in paths):
        return None
    return sum(os.path.getsize(p) for p in paths)


class Progress:
    def __init__(self, desc: str, total: Optional[int] = None, enabled: Optional[bool] = None):
        from tqdm import tqdm
        # No monitor thread: the tools fork worker processes, and forking a threaded process is unsafe.
        tqdm.monitor_interval = 0
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                        disable=None if enabled is None else not enabled, dynamic_ncols=True, mininterval=0.5)
        self.start = time.perf_counter()
        self.documents = 0
        self.tokens = 0
        self._shown = 0.0

    def update(self, nbytes: int, documents: int = 0, tokens: int = 0) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bar.update(nbytes)
        now = time.perf_counter()
        if now - self._shown > 0.5:
            self._shown = now
            self.bar.set_postfix_str(self.rates(), refresh=False)

    def rates(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        text = f"{self.documents / elapsed:,.0f} docs/s"
        if self.tokens:
            text += f", {self.tokens / elapsed:,.0f} tokens/s"
        return text

    def close(self) -> None:
        self.bar.set_postfix_str(self.rates(), refresh=False)
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
