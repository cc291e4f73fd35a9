"""Offline clusters (issue 15): weights that cannot be fetched stop the command with an error naming
the override that takes a local copy and what to fetch; each case runs with the network made
unreachable (DNS and connect refused in-process, empty download caches)."""

import socket
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ditkit.data.text import TextEncoders, text_encoders_from_manifest
from ditkit.data.vae import load_vae
from ditkit.evaluation.decoding import run_vae
from ditkit.evaluation.inception import load_inception
from ditkit.offline import WeightsUnavailableError, is_network_error

REPO = Path(__file__).resolve().parents[1]

HUB_VAE = "ditkit-offline-test/sd-vae"  # no cache anywhere holds it: only the network could
HUB_CLIP = "ditkit-offline-test/clip"


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    def unreachable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch.hub reads it at each call


@pytest.fixture
def hub_offline(no_network, monkeypatch):
    """No network, and HF_HUB_OFFLINE=1 as offline clusters set it (read at import, so patched):
    without it the hub retries its connection for ~25 s per file before giving up, to the same
    error."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("key", ["fid.inception_weights", "callbacks.fid.inception_weights"])
def test_inception_offline_names_its_key_and_the_file(no_network, key):
    with pytest.raises(WeightsUnavailableError) as err:
        load_inception(None, key=key)
    message = str(err.value)
    assert f"pass {key}=PATH" in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message and "wget https://" in message


def test_vae_offline_names_the_override_of_each_command(hub_offline):
    with pytest.raises(WeightsUnavailableError) as err:
        load_vae(HUB_VAE)  # extract_latents
    assert "pass vae.pretrained=DIR" in str(err.value)
    assert f"`hf download {HUB_VAE} --local-dir sd-vae`" in str(err.value)
    manifest = {"vae": {"name": HUB_VAE, "scale_factor": 0.18215, "latent_channels": 4}}
    with pytest.raises(WeightsUnavailableError, match="pass vae=sd_ft_ema vae.pretrained=DIR"):
        run_vae({"root": None, "manifest": None}, HUB_VAE, chosen=True)  # evaluate.py
    from ditkit.data.vae import vae_from_manifest

    with pytest.raises(WeightsUnavailableError, match="pass source.vae=DIR"):
        vae_from_manifest(manifest, override="source.vae=DIR")  # fid_reference source=shards


def test_text_encoder_offline_names_its_list_entry(hub_offline, tmp_path):
    from ditkit.data.text import build_tiny_text_encoders

    local = build_tiny_text_encoders(
        str(tmp_path / "enc"), ["a", "digit"]
    )  # a local T5 first, then the hub CLIP
    t5 = [s for s in local if s["kind"] == "t5"]
    with pytest.raises(WeightsUnavailableError) as err:
        TextEncoders([*t5, {"kind": "clip", "pretrained": HUB_CLIP, "max_length": 8}])
    assert "pass encoders.1.pretrained=DIR" in str(err.value)  # index in the user's list
    manifest = {"text": {"encoders": [{"kind": "clip", "pretrained": HUB_CLIP, "max_length": 8}]}}
    with pytest.raises(WeightsUnavailableError, match="HF_HOME=.* HF_HUB_OFFLINE=1"):
        text_encoders_from_manifest(manifest)  # sample grid / evaluate.py prompts=


def test_network_errors_are_told_from_other_failures():
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError as inner:
            raise OSError("We couldn't load the files") from inner
    except OSError as err:
        assert is_network_error(err)
    assert not is_network_error(ValueError("size mismatch for conv.weight"))


def compose_in(config_dir, name, overrides):
    with initialize_config_dir(config_dir=str(REPO / config_dir), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_every_hint_is_an_override_that_composes():
    """The hints above, pasted into their command lines with a path for DIR / PATH."""
    cfg = compose_in("conf", "evaluate", ["ckpt=x.pt", "vae=sd_ft_ema", "vae.pretrained=/v"])
    assert cfg.vae.pretrained == "/v"
    cfg = compose_in("conf", "train", ["callbacks.sample_grid.vae=/v"])
    assert cfg.callbacks.sample_grid.vae == "/v"
    cfg = compose_in(
        "conf",
        "train",
        [
            "+callbacks@callbacks.fid=fid",
            "callbacks.fid.reference=r.npz",
            "callbacks.fid.vae=/v",
            "callbacks.fid.inception_weights=/i.pth",
        ],
    )
    assert cfg.callbacks.fid.vae == "/v" and cfg.callbacks.fid.inception_weights == "/i.pth"
    cfg = compose_in("conf", "extract_latents", ["out=o", "vae.pretrained=/v"])
    assert cfg.vae.pretrained == "/v"
    cfg = compose_in(
        "conf", "extract_text_embeddings", ["shards=s", "out=o", "encoders.0.pretrained=/c"]
    )
    assert cfg.encoders[0].pretrained == "/c"
    cfg = compose_in(
        "conf/fid_reference",
        "fid_reference",
        [
            "source=shards",
            "source.root=s",
            "source.vae=/v",
            "out=o.npz",
            "fid.inception_weights=/i",
        ],
    )
    assert cfg.source.vae == "/v" and cfg.fid.inception_weights == "/i"
