"""Latent shards: the format, the extraction engine, the streaming datamodule, the VAE helpers,
built-in digits."""

from ditkit.data.datamodule import LatentShardsDataModule
from ditkit.data.format import DataFormatError
from ditkit.data.tensors import TensorDict
from ditkit.data.vae import DiffusersVAE, IdentityVAE, load_vae, vae_from_manifest

__all__ = [
    "DataFormatError",
    "DiffusersVAE",
    "IdentityVAE",
    "LatentShardsDataModule",
    "TensorDict",
    "load_vae",
    "vae_from_manifest",
]
