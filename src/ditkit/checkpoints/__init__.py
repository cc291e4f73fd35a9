"""Checkpoints in one package: atomic writes, training saves and auto-resume, consolidation of
sharded folders, reading for evaluation, and released weights in and out.

    atomic       atomic_write / atomic_path / AtomicFile: the one write helper every writer uses
    lock         RunLock, run_lock, RunLockedError: one run per folder (flock on <run>/run.lock)
    saving       AtomicModelCheckpoint (Lightning callback), CheckpointSaveError
    resume       find_resume_checkpoint, checkpoint_step
    consolidate  consolidate_checkpoint; `python -m ditkit.checkpoints.consolidate FOLDER`
    reading      read_checkpoint: a ditkit .ckpt, an official DiT .pt or a .safetensors, told apart
    official     load_official_dit, read_state_dict, export_weights (safetensors)
    diffusers    to_diffusers, from_diffusers, load_pretrained, instantiate_model: diffusers
                 save_pretrained folders (DiT, SD3, U-Net) in and out; mappings in diffusers_*.py

Names load on first use, so that `ditkit.checkpoints.atomic` stays cheap to import from the data
code.
"""

from importlib import import_module

_NAMES = {
    "AtomicFile": "atomic",
    "atomic_path": "atomic",
    "atomic_write": "atomic",
    "RunLock": "lock",
    "RunLockedError": "lock",
    "run_lock": "lock",
    "AtomicModelCheckpoint": "saving",
    "CheckpointSaveError": "saving",
    "checkpoint_step": "resume",
    "find_resume_checkpoint": "resume",
    "consolidate_checkpoint": "consolidate",
    "LoadedCheckpoint": "reading",
    "read_checkpoint": "reading",
    "dit_config_from_state_dict": "official",
    "export_weights": "official",
    "load_official_dit": "official",
    "read_state_dict": "official",
    "from_diffusers": "diffusers",
    "to_diffusers": "diffusers",
    "load_pretrained": "diffusers",
    "instantiate_model": "diffusers",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_NAMES[name]}"), name)
