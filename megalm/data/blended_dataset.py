"""A weighted mixture of datasets with exact proportions.

Sample i of the blend is taken from the dataset lagging its target share the most (see
`helpers.build_blending_indices`), so after any n samples dataset d has supplied
``weights[d] * n`` samples, within one, and the order is fixed: sample i is always the same.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megalm.data.helpers import build_blending_indices


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        self.datasets = list(datasets)
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, self.size)
        taken = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (dataset, need) in enumerate(zip(self.datasets, taken)):
            if need > len(dataset):
                raise ValueError(f"blended dataset {d} has {len(dataset)} samples but the blend needs {need}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} is outside the {self.size} samples of the blend")
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]
