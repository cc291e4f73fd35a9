"""Small fixes of issue 15: loader workers follow the machine, sample grids have gutters, benchmark
--help texts are complete."""

import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

from ditkit.data.datamodule import LatentShardsDataModule, default_num_workers
from ditkit.training.samples import GUTTER_VALUE, to_grid


def test_loader_workers_default_to_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_num_workers(None) == 2  # a 2-core machine: 2, not 8 (Lightning warned)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_num_workers(None) == 8 and default_num_workers(3) == 3
    module = LatentShardsDataModule(
        latent_size=8, latent_channels=4, num_classes=10, image_size=8, root="/nowhere"
    )
    assert module.num_workers == 8


def test_grid_cells_are_separated_by_grey_gutters():
    # Three 2x2 single-value images (-1 -> 0, 1 -> 255), 2 per row: rows 2x2 + 2 px gutter each way.
    images = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    grid = to_grid(images, nrow=2, gutter=2)
    assert grid.shape == (2 * 2 + 2, 2 * 2 + 2, 3)
    assert (grid[0:2, 0:2] == 0).all() and (grid[0:2, 4:6] == 255).all()
    assert (grid[4:6, 0:2] == 0).all()
    assert (grid[2:4, :] == GUTTER_VALUE).all() and (grid[:, 2:4] == GUTTER_VALUE).all()
    assert (grid[4:6, 4:6] == GUTTER_VALUE).all()  # the empty cell
    assert to_grid(images, nrow=3, gutter=0).shape == (2, 6, 3)  # gutter=0: packed as before


def test_benchmark_help_prints_the_whole_docstring_and_every_argument(monkeypatch, capsys):
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    monkeypatch.setattr(sys, "argv", ["sample.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(bench / "sample.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    words = " ".join(out.split())  # the docstring's end, however it is wrapped
    assert "Each time is the best of `repeats` interleaved runs" in words
    assert "tiny=False" in out and "repeats=3" in out
