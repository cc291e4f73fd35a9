"""VAE helpers: the identity VAE, a saved diffusers AutoencoderKL behind the same interface, manifests."""

import pytest
import torch

from ditkit.data.vae import (
    IDENTITY_LOGVAR,
    DiffusersVAE,
    IdentityVAE,
    load_vae,
    vae_from_manifest,
    vae_info,
)


def test_identity_vae_is_pixel_space():
    vae = load_vae(None)
    assert isinstance(vae, IdentityVAE) and load_vae("identity").name == "identity"
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    moments = vae.encode_moments(x)
    assert torch.equal(moments[:, :3], x) and torch.equal(
        moments[:, 3:], torch.full_like(x, IDENTITY_LOGVAR)
    )
    assert torch.equal(vae.decode(x), x)
    assert vae_info(vae) == {
        "name": "identity",
        "scale_factor": 1.0,
        "latent_channels": 3,
        "downsample": 1,
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_autoencoder):
    path = tmp_path_factory.mktemp("vae") / "tiny"
    autoencoder = tiny_autoencoder()
    autoencoder.save_pretrained(path)
    return path, autoencoder


def test_saved_autoencoder_loads_with_its_moments_decoder_and_scale(saved):
    path, autoencoder = saved
    vae = load_vae(str(path))
    assert isinstance(vae, DiffusersVAE)
    assert (vae.scale_factor, vae.latent_channels, vae.downsample) == (0.18215, 4, 8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = autoencoder.encode(x).latent_dist
        z = posterior.mean
        expected_images = autoencoder.decode(z).sample
    moments = vae.encode_moments(x)
    assert moments.shape == (2, 8, 4, 4)
    torch.testing.assert_close(
        moments, torch.cat([posterior.mean, posterior.logvar], 1), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(vae.decode(z), expected_images, rtol=0, atol=1e-6)


def test_vae_from_manifest_uses_the_recorded_scale_and_an_optional_local_copy(saved):
    path, _ = saved
    manifest = {
        "vae": {
            "name": "stabilityai/sd-vae-ft-ema",
            "scale_factor": 0.5,
            "latent_channels": 4,
            "downsample": 8,
        }
    }
    vae = vae_from_manifest(
        manifest, pretrained=str(path)
    )  # the hub name is replaced: nothing downloads
    assert vae.scale_factor == 0.5 and vae.name == str(path)
    pixel = vae_from_manifest(
        {"vae": {"name": "identity", "scale_factor": 1.0, "latent_channels": 3, "downsample": 1}}
    )
    assert isinstance(pixel, IdentityVAE)


def test_bad_vae_choices_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_vae(str(tmp_path / "does-not-exist"))
    from diffusers import AutoencoderKL

    sd3_like = AutoencoderKL(
        block_out_channels=[8], norm_num_groups=4, shift_factor=0.06, scaling_factor=1.5
    )
    with pytest.raises(ValueError, match="shift_factor"):
        DiffusersVAE(sd3_like, name="sd3")
