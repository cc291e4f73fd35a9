"""Params and forward cost of every model config, as a markdown table (the README's model table).

    python benchmarks/model_table.py                 # 256 px: SD-VAE latents 4 x 32 x 32, 1000 classes
    python benchmarks/model_table.py latent_size=64  # 512 px

Every `conf/model/*.yaml` is built from its Hydra config on the meta device (no memory, no compute);
DiT configs also at patch 4 and 8. Params are counted from `state_dict()` (as in the official DiT
checkpoints, fixed position tables included). The cost is `ditkit.models.flops.forward_flops` for
one
image: GMACs are the DiT paper's "Gflops" (multiply-adds); GFLOPs = 2 x GMACs, what MFU divides by.
MMDiT rows see the class's default text condition (SD3's 154 tokens of width 4096, pooled width
2048).
"""

import inspect
from pathlib import Path

import torch
from common import parse_args
from hydra import compose, initialize_config_dir
from tqdm import tqdm

from ditkit.checkpoints import instantiate_model
from ditkit.models import DiT, MMDiT
from ditkit.models.flops import forward_flops

CONF = Path(__file__).resolve().parents[1] / "conf"
DIT_PATCHES = (2, 4, 8)
FAMILIES = ("dit", "mmdit", "unet")


def settings() -> list[tuple[str, list[str]]]:
    """(config name, extra overrides) for every model config; DiTs at each patch size."""
    rows = []
    for path in sorted((CONF / "model").glob("*.yaml")):
        name = path.stem
        patches = DIT_PATCHES if name.startswith("dit_") else (None,)
        rows += [(name, [] if p is None else [f"model.patch_size={p}"]) for p in patches]
    return rows


def build(name: str, overrides: list[str], latent_size: int) -> torch.nn.Module:
    """A model from its config, on meta, for ImageNet latents; text widths (MMDiT) are the class
    defaults."""
    text = inspect.signature(MMDiT).parameters
    data = [
        f"+data.latent_size={latent_size}",
        "+data.latent_channels=4",
        "+data.num_classes=1000",
        *(
            f"+data.{key}={text[key].default}"
            for key in ("context_dim", "pooled_dim", "context_len")
        ),
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}", *data, *overrides])
    with torch.device("meta"):
        return instantiate_model(cfg.model)


def example_inputs(model: torch.nn.Module, latent_size: int) -> tuple[torch.Tensor, ...]:
    """One image's forward inputs, on meta: (x, t, y) or MMDiT's (x, t, context, pooled)."""
    with torch.device("meta"):
        x, t = torch.empty(1, model.in_channels, latent_size, latent_size), torch.empty(1)
        if isinstance(model, MMDiT):
            return (
                x,
                t,
                torch.empty(1, model.context_len, model.context_dim),
                torch.empty(1, model.pooled_dim),
            )
        return x, t, torch.zeros(1, dtype=torch.long)


def label(name: str, model: torch.nn.Module) -> str:
    if isinstance(model, DiT):
        paper = f"DiT-{name.removeprefix('dit_').upper()}/{model.patch_size}"
        return (
            f"`{name}` `model.patch_size={model.patch_size}` ({paper})"
            if model.patch_size != 2
            else f"`{name}` ({paper})"
        )
    return f"`{name}`"


def family_rank(name: str) -> int:
    """Position of a config's family (`dit_s` -> dit) in FAMILIES; unknown families go last."""
    family = name.split("_")[0]
    return FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)


def main() -> None:
    args = parse_args(dict(latent_size=32))
    size = args["latent_size"]
    lines = ["| model | params | GMACs | GFLOPs |", "| --- | ---: | ---: | ---: |"]
    groups: dict[str, list[tuple[float, str]]] = {}  # config -> rows, each (cost, markdown line)
    for name, overrides in tqdm(settings(), desc="models"):
        model = build(name, overrides, size)
        params = sum(v.numel() for v in model.state_dict().values())
        flops = forward_flops(model, *example_inputs(model, size))
        line = f"| {label(name, model)} | {params / 1e6:.1f} M | {flops / 2e9:.2f} | {flops / 1e9:.2f} |"
        groups.setdefault(name, []).append((flops, line))
    # families in the order DiT, MMDiT, U-Net; within one, configs by the cost of their first row (S
    # before B)
    order = sorted(groups, key=lambda n: (family_rank(n), groups[n][0][0]))
    lines += [line for name in order for _, line in groups[name]]
    print(
        f'Per image at {8 * size} px (latents 4 x {size} x {size}); GMACs = the DiT paper\'s "Gflops".\n'
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
