"""tools/bench/finetune.py: a --quick run of the megalm configurations gives the table and the JSON;
bad --configs are named."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "bench", "finetune.py")
MEGALM = ["megalm-full", "megalm-full-packed", "megalm-lora", "megalm-lora-packed", "megalm-qlora",
          "megalm-qlora-packed"]


def _bench(*flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *flags], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_quick_run_tabulates_every_megalm_configuration(tmp_path):
    out = _bench("--quick", "--configs", "megalm", "--json", str(tmp_path / "results.json"),
                 "--work-dir", str(tmp_path / "work"))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| megalm-")]
    assert rows == MEGALM, out.stdout
    assert "| QLoRA / full fine-tuning peak memory (packed) |" in out.stdout
    assert "| packed / unpacked tokens/s (megalm-lora) |" in out.stdout
    assert "trl-lora" not in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["results"]) == MEGALM
    for r in results["results"].values():
        assert r["tokens_per_s"] > 0 and r["peak_mb"] > 0 and 0 < r["packing_efficiency"] <= 1
    # Packed rows carry more real tokens than one right-padded sample each.
    r = results["results"]
    assert r["megalm-lora-packed"]["packing_efficiency"] > r["megalm-lora"]["packing_efficiency"]
    assert {c["ratio"] for c in results["comparisons"]} >= {"QLoRA / full fine-tuning peak memory (unpacked)",
                                                           "packed / unpacked tokens/s (megalm-full)"}


def test_unknown_configuration_is_named():
    out = _bench("--configs", "megalm-lora,dpo")
    assert out.returncode == 1 and "error: --configs megalm-lora,dpo: unknown dpo" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
