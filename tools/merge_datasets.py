#!/usr/bin/env python
"""Concatenate several `.bin/.idx` datasets into one.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/parts/ --output-prefix data/all_text_document

--input takes dataset prefixes, or one directory whose every PREFIX.bin/.idx pair is merged in
sorted order. All inputs must hold the same token type (the same tokenizer).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalm.data.cli import ArgumentParser, run  # noqa: E402


def main(argv=None) -> int:
    from megalm.data.errors import DataError
    from megalm.data.indexed_dataset import IndexedDataset, dataset_exists, merge_datasets

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="Dataset prefixes, or one directory.")
    parser.add_argument("--output-prefix", required=True, help="Writes OUTPUT_PREFIX.bin/.idx.")
    args = parser.parse_args(argv)
    prefixes = args.input
    if len(prefixes) == 1 and os.path.isdir(prefixes[0]):
        directory = prefixes[0]
        prefixes = sorted(os.path.join(directory, name[:-4]) for name in os.listdir(directory)
                          if name.endswith(".idx") and dataset_exists(os.path.join(directory, name[:-4])))
        if not prefixes:
            raise DataError(f"--input {directory}: the directory holds no PREFIX.bin/.idx pairs")
    for prefix in prefixes:
        if not dataset_exists(prefix):
            raise DataError(f"--input {prefix}: {prefix}.bin / {prefix}.idx not found (give prefixes, "
                            f"without the extension)")
    if os.path.dirname(args.output_prefix):
        os.makedirs(os.path.dirname(args.output_prefix), exist_ok=True)
    merge_datasets(prefixes, args.output_prefix)
    merged = IndexedDataset(args.output_prefix)
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}: {merged.num_documents} documents, "
          f"{merged.num_tokens} tokens ({merged.dtype.name})")
    return 0


if __name__ == "__main__":
    run(main)
