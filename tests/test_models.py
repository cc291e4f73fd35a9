"""DiT parity with the reference implementation, the variant table, options, and official checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from ditkit.checkpoints import instantiate_model, load_official_dit, read_state_dict
from ditkit.models import DiT, build_dit
from ditkit.models.attention import apply_rope, attention, gelu_tanh
from ditkit.models.embeddings import rope_2d
from ditkit.objectives import Guidance

FIXTURES = Path(__file__).parent / "fixtures"
CONF = Path(__file__).parents[1] / "conf"


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURES / "dit_reference_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURES / "dit_official_manifest.json").read_text())


def reference_model(ref) -> DiT:
    model = DiT(**ref["model_config"])
    model.load_state_dict(ref["state_dict"], strict=True)
    return model.eval()


def reference_model_f64(ref) -> DiT:
    """The fixture's model in float64. The fixture holds the reference's float32 outputs; this forward
    is exact to ~1e-15 on any CPU, so a difference from the fixture is the reference's own float32
    rounding (measured: < 2e-6), the same on every machine. atol=1e-5 bounds it 5x over."""
    return reference_model(ref).double()


def f64(inputs: dict, *names: str) -> list[torch.Tensor]:
    return [inputs[n].double() if inputs[n].is_floating_point() else inputs[n] for n in names]


def test_fixed_position_table_equals_reference(ref):
    model = DiT(**ref["model_config"])
    torch.testing.assert_close(model.pos_embed, ref["state_dict"]["pos_embed"], rtol=0, atol=1e-6)


def test_forward_matches_reference(ref):
    model = reference_model_f64(ref)
    with torch.no_grad():
        out = model(*f64(ref["inputs"], "x", "t", "y"))
    torch.testing.assert_close(out.float(), ref["outputs"]["forward"], rtol=0, atol=1e-5)


def test_guidance_on_three_channels_matches_reference_forward_with_cfg(ref):
    """The reference's forward_with_cfg on [x, x] with labels [y, null]: both halves hold the guided
    first 3 channels, then each half's own remaining channels. ditkit's one guidance implementation
    (objectives.Guidance) returns the conditional half; the null half's rest is the null forward."""
    model = reference_model_f64(ref)
    x, t, y = (v[:2] for v in f64(ref["inputs"], "x", "t", "y"))
    expected = ref["outputs"]["forward_with_cfg_3ch"]
    guidance = Guidance.build(model, {"y": y}, ref["inputs"]["cfg_scale"], 3)
    with torch.no_grad():
        guided = guidance(model, x, t, {"y": y}, time=0.0, pred_channels=4)
        uncond = model(x, t, **model.null_condition(y))
    torch.testing.assert_close(guided.float(), expected[:2], rtol=0, atol=1e-5)
    null_half = torch.cat([guided[:, :3], uncond[:, 3:]], dim=1)
    torch.testing.assert_close(null_half.float(), expected[2:], rtol=0, atol=1e-5)


def test_guidance_guides_all_eps_channels_by_default(ref):
    """Exact in float64: eps = uncond + s (cond - uncond) on all 4 eps channels, the variance taken
    from the conditional output."""
    model = reference_model_f64(ref)
    xs, ts, ys = (v[:2] for v in f64(ref["inputs"], "x", "t", "y"))
    null = torch.full((2,), ref["model_config"]["num_classes"])
    s = 2.5
    with torch.no_grad():
        cond, uncond = model(xs, ts, ys), model(xs, ts, null)
        out = Guidance.build(model, {"y": ys}, s)(model, xs, ts, {"y": ys}, 0.0, pred_channels=4)
    expected_eps = uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(out[:, :4], expected_eps, rtol=0, atol=1e-12)
    # The variance channels are the conditional half's (a batch of 4 rather than 2: fp64 rounding).
    torch.testing.assert_close(out[:, 4:], cond[:, 4:], rtol=0, atol=1e-12)


def test_official_layout_keys_and_shapes(manifest):
    for name, size in (("DiT-XL/2@256", 32), ("DiT-XL/2@512", 64)):
        with torch.device("meta"):
            model = build_dit("XL", 2, input_size=size)
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert shapes == manifest[name]["state_dict_shapes"], name


def test_parameter_counts_of_all_variants(manifest):
    assert len(manifest) == 13
    for name, entry in manifest.items():
        variant, patch = name.split("@")[0].removeprefix("DiT-").split("/")
        with torch.device("meta"):
            model = build_dit(variant, int(patch), input_size=entry["input_size"])
        assert sum(v.numel() for v in model.state_dict().values()) == entry["params"], name


def test_dit_xl2_forward_flops_match_the_paper():
    with torch.device("meta"):
        model = build_dit("XL", 2, input_size=32)
    assert (
        abs(model.forward_flops() / 2 / 118.6e9 - 1) < 0.01
    )  # paper Table 4: 118.6 Gflops (multiply-adds)


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: S, B, L, XL"):
        build_dit("XXL")


def test_patch_size_must_divide_latent_size():
    with pytest.raises(ValueError, match="patch_size 4 does not divide the latent size 6"):
        DiT(input_size=6, patch_size=4, hidden_size=32, depth=1, num_heads=2)


def compose_model(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            overrides=[
                "+data.latent_size=32",
                "+data.latent_channels=4",
                "+data.num_classes=1000",
                *overrides,
            ]
        )


@pytest.mark.parametrize(
    "variant,patch,params",
    [("dit_s", 2, 32963360), ("dit_b", 4, 130475648), ("dit_xl", 8, 675683072)],
)
def test_hydra_model_configs(variant, patch, params):
    cfg = compose_model(f"+model={variant}", f"model.patch_size={patch}")
    with torch.device("meta"):
        model = instantiate_model(cfg.model)
    assert isinstance(model, DiT) and model.patch_size == patch
    assert sum(v.numel() for v in model.state_dict().values()) == params


def test_hydra_unknown_model_lists_available_options():
    with pytest.raises(MissingConfigException) as err:
        compose_model("+model=dit_xxl")
    assert all(name in str(err.value) for name in ("dit_s", "dit_b", "dit_l", "dit_xl"))


OPTIONS = [
    dict(block="adaln"),
    dict(block="cross_attn"),
    dict(block="in_context"),
    dict(qk_norm=True),
    dict(norm="rmsnorm"),
    dict(mlp="swiglu"),
    dict(rope=True),
    dict(block="in_context", rope=True, norm="rmsnorm", mlp="swiglu", qk_norm=True),
]


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_each_option_trains(options):
    """Regress a fixed random target: 50 AdamW steps must cut the loss at least in half."""
    torch.manual_seed(0)
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=10,
        class_dropout_prob=0.0,
        **options,
    )
    x, t, y = torch.randn(8, 4, 8, 8), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    target = torch.randn(8, 8, 8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = (model(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_exact_softmax_attention(dtype):
    """Outputs and gradients against float64 SDPA; bf16 on CPU takes the matmul + softmax path, whose
    error must stay at bf16 rounding (~4e-3 relative), not at a wrong scale or softmax axis."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 48, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, 48, 16, dtype=torch.float64)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    exact_grads = torch.autograd.grad(exact, (q, k, v), g)
    low = [a.detach().to(dtype).requires_grad_() for a in (q, k, v)]
    out = attention(*low)
    grads = torch.autograd.grad(out, low, g.to(dtype))
    # Relative error of the whole tensor: float32 rounding is ~1e-7 (tolerance 100x), bf16's 2^-8 ~
    # 4e-3 (2.5x); a wrong scale or softmax axis is off by O(1).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip((out, *grads), (exact, *exact_grads)):
        assert got.dtype == dtype
        assert (got.double() - want).norm() / want.norm() < tol


def test_gelu_tanh_compiled_form_is_the_same_function(monkeypatch):
    """Under torch.compile, x * sigmoid(2z) stands in for 0.5 x (1 + tanh z): equal to rounding in fp64."""
    x = torch.linspace(-8, 8, 10001, dtype=torch.float64)
    eager = gelu_tanh(x)
    torch.testing.assert_close(
        eager, torch.nn.functional.gelu(x, approximate="tanh"), rtol=0, atol=0
    )
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(gelu_tanh(x), eager, rtol=1e-12, atol=1e-12)


def test_rope_attention_depends_only_on_relative_position():
    """<R(p) q, R(s) k> = <q, R(s - p) k>: shifting both positions by one row leaves scores unchanged."""
    grid, hd = 4, 8
    rope = rope_2d(hd, grid)
    q, k = torch.randn(hd), torch.randn(hd)
    rq = apply_rope(q.expand(1, 1, grid * grid, hd), rope)[0, 0]
    rk = apply_rope(k.expand(1, 1, grid * grid, hd), rope)[0, 0]
    score = rq @ rk.T  # (T, T)
    # token (r, c) has index r * grid + c; shift both query and key one row down
    # 8-element float32 dot products of O(1) values: rounding ~1e-7, the tolerance 100x that.
    for qi, ki in [(0, 5), (1, 6), (2, 3)]:
        torch.testing.assert_close(score[qi, ki], score[qi + grid, ki + grid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score[0, 0], q @ k, rtol=1e-5, atol=1e-5)  # position 0 is unrotated


def test_load_official_checkpoint_infers_config(ref, tmp_path):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(ref["state_dict"], path)
    with pytest.raises(ValueError, match="width 64 is not a published variant; pass num_heads="):
        load_official_dit(path)  # heads cannot be read off the tensors for a custom width
    model = load_official_dit(path, num_heads=4)
    for key in (
        "input_size",
        "patch_size",
        "in_channels",
        "hidden_size",
        "depth",
        "num_heads",
        "num_classes",
        "learn_sigma",
    ):
        assert getattr(model, key) == ref["model_config"][key], key
    with torch.no_grad():  # float64, as test_forward_matches_reference (see reference_model_f64)
        out = model.double()(*f64(ref["inputs"], "x", "t", "y"))
    torch.testing.assert_close(out.float(), ref["outputs"]["forward"], rtol=0, atol=1e-5)
    # the reference training script's checkpoints: {"model", "ema", "opt", "args"}; EMA is taken
    torch.save({"model": {}, "ema": ref["state_dict"]}, tmp_path / "train.pt")
    assert load_official_dit(tmp_path / "train.pt", num_heads=4).hidden_size == 64


def test_official_loader_errors_name_the_problem(ref, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_official_dit(tmp_path / "nope.pt")
    path = tmp_path / "cut.pt"
    torch.save(ref["state_dict"], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt.*truncated"):
        load_official_dit(path)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DiT checkpoint.*x_embedder.proj.weight"):
        load_official_dit(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no state_dict"):
        read_state_dict(tmp_path / "list.pt")
