"""Compile and activation checkpointing are applied from outside the model, to its `blocks`
(ditkit.training.parallel): the same code serves DiT, MMDiT and the U-Net. Checkpointing must give
the plain model's gradients (float64: the recomputation repeats the same operations, so they agree to
rounding of 1e-12 at most) and must keep fewer activations for the backward."""

import pytest
import torch

from ditkit.models import DiT, MMDiT, UNet
from ditkit.training.parallel import checkpoint_blocks


def dit():
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=3,
        num_heads=2,
        num_classes=10,
        class_dropout_prob=0.0,
    )
    return model, {"y": torch.tensor([1, 2])}


def mmdit():
    model = MMDiT(
        input_size=8,
        patch_size=2,
        in_channels=4,
        depth=3,
        head_dim=16,
        context_dim=12,
        pooled_dim=6,
        context_len=5,
        caption_dropout_prob=0.0,
    )
    g = torch.Generator().manual_seed(3)
    return model, {
        "context": torch.randn(2, 5, 12, generator=g),
        "pooled": torch.randn(2, 6, generator=g),
    }


def unet():
    model = UNet(
        input_size=8,
        in_channels=4,
        num_classes=10,
        block_out_channels=(16, 32),
        attention_levels=(1,),
        attention_head_dim=8,
        norm_num_groups=8,
        class_dropout_prob=0.0,
    )
    return model, {"y": torch.tensor([1, 2])}


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward while `fn` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize("build", [dit, mmdit, unet], ids=["dit", "mmdit", "unet"])
def test_activation_checkpointing_keeps_gradients_and_saves_memory(build):
    torch.manual_seed(0)
    plain, condition = build()
    plain = plain.double().train()
    with torch.no_grad():  # non-zero weights everywhere, so every block matters
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    wrapped, _ = build()
    wrapped = wrapped.double().train()
    wrapped.load_state_dict(plain.state_dict())
    checkpoint_blocks(wrapped)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([3.0, 700.0], dtype=torch.float64)
    cond = {k: v.double() if v.is_floating_point() else v for k, v in condition.items()}

    plain_bytes, out_plain = saved_bytes(lambda: plain(x, t, **cond))
    wrapped_bytes, out_wrapped = saved_bytes(lambda: wrapped(x, t, **cond))
    torch.testing.assert_close(out_wrapped, out_plain, rtol=0, atol=0)
    out_plain.square().sum().backward()
    out_wrapped.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-12, msg=name)
    # What the blocks would keep is recomputed: far less is saved (the block inputs remain).
    assert wrapped_bytes < 0.7 * plain_bytes, (wrapped_bytes, plain_bytes)
    assert set(wrapped.state_dict()) == set(plain.state_dict())  # names unchanged


def test_checkpointed_blocks_run_plain_without_grad():
    model, condition = dit()
    checkpoint_blocks(model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        out = model(x, t, **condition)
    assert out.grad_fn is None
