"""In-memory data as batch dicts: `TensorDict({"x": latents, "y": labels})` is a map-style dataset
whose samples are dicts, so a plain `torch.utils.data.DataLoader` collates them into the batch dicts
the training module hands to the objective (the same fields as the latent shards give). For
notebooks, small experiments and tests; large data sets stream from shards
(`LatentShardsDataModule`)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class TensorDict(Dataset):
    """fields: name -> tensor, all with the same first dimension N; sample i is {name:
    tensor[i]}."""

    def __init__(self, fields: dict[str, torch.Tensor]):
        if "x" not in fields:
            raise ValueError(f"TensorDict needs an 'x' field (the latents); got {sorted(fields)}")
        lengths = {name: len(value) for name, value in fields.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"TensorDict fields differ in length: {lengths}")
        self.fields = dict(fields)
        self.length = lengths["x"]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: value[i] for name, value in self.fields.items()}
