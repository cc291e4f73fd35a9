"""LatentShardsDataModule streams: posterior draws, flips, seeds, ranks, epochs, resume, URLs;
batches are dicts {"x", "y", "key"}."""

import math
from itertools import islice

import numpy as np
import pytest
import torch

from ditkit.data import LatentShardsDataModule
from ditkit.data.datamodule import ResumableLoader

SIZES = (6, 5, 4, 3, 2)  # 20 samples in 5 uneven shards


@pytest.fixture
def shards(tmp_path, write_latent_shards):
    keys = write_latent_shards(tmp_path / "shards", SIZES)
    return tmp_path / "shards", keys


@pytest.fixture
def make(datamodule_kwargs):
    def make(root, **overrides):
        dm = LatentShardsDataModule(**datamodule_kwargs(root, **overrides))
        dm.setup()
        return dm

    return make


def run_keys(loader, n=None):
    """(keys, latents, labels) of the next n batches (all of the pass if n is None), taking no more
    than n."""
    return [(tuple(b["key"]), b["x"].clone(), b["y"].clone()) for b in islice(loader, n)]


def keys_read(dm, epochs: int = 4) -> set:
    """Every key the training stream hands out over `epochs` epochs."""
    loader = dm.train_dataloader()
    return {k for _ in range(epochs) for b in loader for k in b["key"]}


def same(a, b):
    return len(a) == len(b) and all(
        x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, b)
    )


def test_each_read_is_a_scaled_posterior_draw_of_a_random_flip(tmp_path, make, write_latent_shards):
    # mean = +index (mirror: -index), logvar = log 4 (std 2), scale 0.5: latent / 0.5 = +-index + 2 eps.
    write_latent_shards(tmp_path, SIZES, logvar=math.log(4.0), scale=0.5)
    dm = make(tmp_path, batch_size=4)
    assert dm.scale_factor == 0.5 and len(dm.train_dataloader()) == 5
    loader = dm.train_dataloader()
    flips, eps = [], []
    for _ in range(6):  # six epochs: 120 reads
        for batch in loader:
            assert sorted(batch) == ["key", "x", "y"]
            latents, labels, keys = batch["x"], batch["y"], batch["key"]
            assert (
                latents.dtype == torch.float32
                and latents.shape == (4, 4, 8, 8)
                and labels.dtype == torch.int64
            )
            for z, y, key in zip(latents / 0.5, labels, keys):
                index = int(key[1:])
                assert y == index % 10
                if index == 0:
                    continue
                sign = 1.0 if z.mean() > 0 else -1.0  # mean of 256 values: index +- 0.125 noise
                flips.append(sign < 0)
                eps.append((z - sign * index) / 2)
    eps = torch.stack(eps)
    assert 0.35 < np.mean(flips) < 0.65
    assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02


def test_stream_depends_on_seed_and_rank_and_epoch_only(shards, make, monkeypatch):
    root, _ = shards
    a = run_keys(make(root, num_workers=2).train_dataloader())
    assert len(a) == 10  # 20 samples // batch 2
    assert a[0][0] != a[1][0]  # the two workers read different streams
    assert same(a, run_keys(make(root, num_workers=2).train_dataloader()))
    assert not same(a, run_keys(make(root, num_workers=2, seed=1).train_dataloader()))
    loader = make(root).train_dataloader()
    epoch0, epoch1 = run_keys(loader), run_keys(loader)
    assert len(epoch1) == 10 and not same(epoch0, epoch1)  # each epoch is reseeded
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        loader = make(root, num_workers=2).train_dataloader()
        assert len(loader) == 5  # 20 // (2 per batch * 2 ranks): the same on every rank
        per_rank.append(run_keys(loader))
        assert len(per_rank[-1]) == 5
    assert not same(per_rank[0], per_rank[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resumes_the_stream_exactly(shards, make, workers):
    root, _ = shards
    loader = make(root, num_workers=workers).train_dataloader()
    straight = run_keys(loader) + run_keys(loader)  # two epochs of 10 batches
    dm = make(root, num_workers=workers)
    first = run_keys(dm.train_dataloader(), 7)
    state = dm.state_dict()
    assert state["epoch"] == 0 and state["batches"] == 7
    resumed = make(root, num_workers=workers)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    rest = run_keys(loader) + run_keys(loader)  # the rest of epoch 0, then epoch 1
    assert same(first + rest[:13], straight)


def test_position_counts_what_the_consumer_used_not_what_was_prefetched(shards, make):
    root, _ = shards
    dm = make(root)
    used = {"n": 100}  # a trainer's running batch counter, 100 batches before this pass
    loader = ResumableLoader(dm.train_dataloader().stream, 10, 0, consumed=lambda: used["n"])
    iterator = iter(loader)
    for _ in range(4):  # the consumer fetched 4 batches, but has trained on 3 so far
        next(iterator)
    used["n"] += 3
    assert loader.position() == (0, 3)
    assert loader.state_dict()["batches"] == 3


def test_urls_brace_pattern_pipe_and_manifest_location(shards, tmp_path, datamodule_kwargs):
    root, keys = shards
    kwargs = datamodule_kwargs(root)
    kwargs.pop("root")
    by_urls = LatentShardsDataModule(**kwargs, urls=f"{root}/train-{{000000..000004}}.tar")
    assert keys_read(by_urls) == set(keys)  # 4 epochs of draws with replacement reach all 20
    piped = [f"pipe:cat {root}/train-00000{i}.tar" for i in range(5)]
    assert keys_read(LatentShardsDataModule(**kwargs, urls=piped)) == set(keys)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train-000000.tar").write_bytes((root / "train-000000.tar").read_bytes())
    with pytest.raises(FileNotFoundError, match="data.manifest"):
        LatentShardsDataModule(**kwargs, urls=[str(elsewhere / "train-000000.tar")]).setup()
    moved = LatentShardsDataModule(
        **kwargs, urls=[str(elsewhere / "train-000000.tar")], manifest=str(root / "manifest.json")
    )
    assert keys_read(moved) == set(keys[:6])


def test_a_rebuilt_train_loader_continues(shards, make):
    root, _ = shards
    straight = run_keys(make(root).train_dataloader())
    dm = make(root)
    first = run_keys(dm.train_dataloader(), 3)
    # Trainer(reload_dataloaders_every_n_epochs=...) builds a new loader: it continues the stream.
    assert same(first + run_keys(dm.train_dataloader()), straight)
