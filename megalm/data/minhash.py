"""Near-duplicate detection with MinHash and locality-sensitive hashing (Broder 1997).

A document becomes the set of its n-grams ("shingles", on text simplified as datatrove does: lower
case, no punctuation, digits as 0): word 5-grams by default, but character 3-grams in Chinese and
Japanese, which have no spaces. A CJK character carries about as much as a short English word,
so one edited character spoils n shingles: with character 5-grams a 2% edit of a 60-character
text already drops the Jaccard similarity to about 0.7, with 3-grams to about 0.82. Each
position of a mixed document starts a shingle of its own script's size (`text.split_words`
gives the units: words, CJK characters, or jieba's words). A MinHash signature keeps, for each
of `num_perm` random hash functions, the smallest hash over the shingles; two signatures agree in
each position with probability equal to the Jaccard similarity of the two sets.

LSH cuts the signature into `bands` bands of `rows` values (datatrove: 14 x 8 = 112). Two
documents become candidates when they agree on a whole band, which happens with probability
``1 - (1 - J^rows)^bands`` (J = 0.8: 0.92; J = 0.5: 0.05). A candidate is then confirmed when the
signatures agree in at least `threshold` of their positions (the Jaccard estimate), so the
threshold flag sets the similarity that counts as a duplicate. The first document of a group is
kept, later ones are duplicates.

Memory grows with the documents kept: one signature (4 bytes x num_perm) and `bands` dictionary
entries each.
"""

from __future__ import annotations

import zlib
from typing import Optional

import numpy as np

from megalm.data.text import has_cjk, is_cjk_word, simplify_for_hashing, split_words

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_CHUNK = 2048


class MinHasher:
    """Signatures of `num_perm` 32-bit values for word `shingle_size`-grams (`cjk_shingle_size`-grams
    where a CJK unit starts the shingle)."""

    def __init__(self, shingle_size: int = 5, num_perm: int = 112, seed: int = 1, simplify: bool = True,
                 cjk_shingle_size: int = 3, segmenter: str = "char"):
        if shingle_size < 1 or num_perm < 1 or cjk_shingle_size < 1:
            raise ValueError("shingle sizes and num_perm must be positive")
        self.shingle_size = shingle_size
        self.cjk_shingle_size = cjk_shingle_size
        self.segmenter = segmenter
        self.num_perm = num_perm
        self.simplify = simplify
        rng = np.random.RandomState(seed)
        # Multiply-shift hashing (Dietzfelbinger et al. 1997): h_i(x) = ((a_i x + b_i) mod 2^64) >> 32
        # with odd a_i, a universal family as good as the classic mod-prime one and several times
        # cheaper in numpy.
        self.a = rng.randint(1, 1 << 63, size=(num_perm, 1), dtype=np.uint64) | np.uint64(1)
        self.b = rng.randint(0, 1 << 63, size=(num_perm, 1), dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """32-bit hashes of the n-grams of `text` (a text shorter than one shingle is one shingle)."""
        text = simplify_for_hashing(text) if self.simplify else text
        words = split_words(text, self.segmenter)
        if not words:
            return np.zeros(1, dtype=np.uint64)
        word_hashes = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
        h = np.zeros(0, dtype=np.uint64)
        if has_cjk(text):
            cjk = np.fromiter(map(is_cjk_word, words), dtype=bool, count=len(words))
            parts = [_ngram_hashes(word_hashes, n)[mask[:len(words) - n + 1]]
                     for n, mask in ((self.shingle_size, ~cjk), (self.cjk_shingle_size, cjk)) if n <= len(words)]
            h = np.concatenate(parts) if parts else h
            shortest = self.cjk_shingle_size if cjk.mean() > 0.5 else self.shingle_size
        else:
            shortest = self.shingle_size
        if not len(h):  # pure-script text, or a mixed one too short for any shingle of its own size
            h = _ngram_hashes(word_hashes, min(shortest, len(words)))
        return (h ^ (h >> np.uint64(32))) & _MASK32

    def signature(self, text: str) -> np.ndarray:
        shingles = self.shingles(text)
        signature = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(shingles), _CHUNK):
                x = shingles[start:start + _CHUNK][None, :]
                np.minimum(signature, ((self.a * x + self.b) >> _SHIFT32).min(axis=1), out=signature)
        return signature.astype(np.uint32)


def _ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of the n-gram starting at each position (wrapping arithmetic)."""
    m = len(word_hashes) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * np.uint64(0x100000001B3) + word_hashes[k:k + m]
    return h


class LSHIndex:
    """Streaming LSH: `query_or_add` returns the id of an earlier near duplicate, or records the
    document and returns None."""

    def __init__(self, num_perm: int = 112, bands: int = 14, threshold: float = 0.7):
        if num_perm % bands:
            raise ValueError(f"--minhash-num-perm {num_perm} is not a multiple of --minhash-bands {bands}")
        self.bands, self.rows = bands, num_perm // bands
        self.threshold = threshold
        self.buckets: dict[int, int] = {}
        self.signatures = np.zeros((1024, num_perm), dtype=np.uint32)
        self.count = 0
        rng = np.random.RandomState(0)
        self._mix = rng.randint(1, 1 << 62, size=(1, self.rows), dtype=np.uint64) | np.uint64(1)
        self._band_salt = np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)

    def band_keys(self, signature: np.ndarray) -> list[int]:
        bands = signature.reshape(self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            keys = (bands * self._mix).sum(axis=1, dtype=np.uint64) ^ self._band_salt
        return keys.tolist()

    def similarity(self, signature: np.ndarray, doc: int) -> float:
        return float(np.mean(self.signatures[doc] == signature))

    def query_or_add(self, signature: np.ndarray) -> Optional[int]:
        keys = self.band_keys(signature)
        checked = set()
        for key in keys:
            doc = self.buckets.get(key)
            if doc is not None and doc not in checked:
                if self.similarity(signature, doc) >= self.threshold:
                    return doc
                checked.add(doc)
        doc = self.count
        if doc == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
        self.signatures[doc] = signature
        self.count += 1
        for key in keys:
            self.buckets.setdefault(key, doc)
        return None
