#!/usr/bin/env python
"""Near-duplicate detection benchmark: our MinHash + LSH against `datasketch`, one run.

    python tools/bench/dedup.py [--max-mb 10] [--copies 0.2]

Documents: the Python standard library's sources plus, for a fraction (--copies) of them, a
lightly edited copy (1% of the words replaced: Jaccard about 0.9), so there are known near-duplicate pairs. Both
sides hash the same shingles (word 5-grams of the same simplified text) with 112 permutations
in 14 bands x 8 rows and process documents in order, asking for earlier near duplicates before
adding each one. Reported: signature + index time, documents flagged, agreement between the two,
and recall of the planted copies.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from megalm.data.minhash import LSHIndex, MinHasher  # noqa: E402
from megalm.data.text import simplify_for_hashing, split_words  # noqa: E402
from tools.make_stdlib_corpus import stdlib_sources  # noqa: E402


def documents(max_mb: float, copies: float, seed: int = 0):
    rng = random.Random(seed)
    texts = [text for _, text in stdlib_sources(int(max_mb * 1e6)) if len(text.split()) >= 50]
    planted = {}
    for i in rng.sample(range(len(texts)), int(copies * len(texts))):
        words = texts[i].split(" ")
        real = [j for j, w in enumerate(words) if w.strip()]
        for j in rng.sample(real, max(1, len(real) // 100)):
            words[j] = "edited"
        planted[len(texts)] = i
        texts.append(" ".join(words))
    return texts, planted


def run_ours(texts, threshold):
    hasher, index = MinHasher(5, 112), LSHIndex(112, 14, threshold)
    return [index.query_or_add(hasher.signature(t)) is not None for t in texts]


def run_datasketch(texts, threshold):
    from datasketch import MinHash, MinHashLSH
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    signatures, flagged = {}, []
    for i, text in enumerate(texts):
        words = split_words(simplify_for_hashing(text))
        shingles = {" ".join(words[k:k + 5]).encode("utf-8") for k in range(max(1, len(words) - 4))}
        m = MinHash(num_perm=112)
        m.update_batch(list(shingles))
        candidates = lsh.query(m)
        # Same confirmation rule as ours: the estimated Jaccard must reach the threshold.
        duplicate = any(m.jaccard(signatures[c]) >= threshold for c in candidates)
        flagged.append(duplicate)
        if not duplicate:
            lsh.insert(i, m)
            signatures[i] = m
    return flagged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-mb", type=float, default=10.0)
    parser.add_argument("--copies", type=float, default=0.2, help="Fraction of documents given an edited copy.")
    parser.add_argument("--threshold", type=float, default=0.7)
    args = parser.parse_args()
    texts, planted = documents(args.max_mb, args.copies)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"{len(texts)} documents ({len(planted)} planted near copies), {nbytes / 1e6:.1f} MB", flush=True)
    start = time.perf_counter()
    ours = np.array(run_ours(texts, args.threshold))
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    theirs = np.array(run_datasketch(texts, args.threshold))
    t_theirs = time.perf_counter() - start
    copies = np.array(sorted(planted))
    result = {
        "documents": len(texts), "planted": len(planted),
        "seconds": {"megalm": round(t_ours, 2), "datasketch": round(t_theirs, 2)},
        "speedup": round(t_theirs / t_ours, 2),
        "flagged": {"megalm": int(ours.sum()), "datasketch": int(theirs.sum()), "both": int((ours & theirs).sum())},
        "planted_recall": {"megalm": float(ours[copies].mean()), "datasketch": float(theirs[copies].mean())},
    }
    print(f"megalm      {t_ours:7.2f} s  flagged {ours.sum():5d}  planted recall {ours[copies].mean():.3f}")
    print(f"datasketch  {t_theirs:7.2f} s  flagged {theirs.sum():5d}  planted recall {theirs[copies].mean():.3f}")
    print(f"speed-up {t_theirs / t_ours:.1f}x; flagged by both: {(ours & theirs).sum()}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
