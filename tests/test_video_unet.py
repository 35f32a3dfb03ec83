"""The inflated video UNet against independent references: the 2D UNet frame by frame, naive loops."""
import copy
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ei2 import RECIPES, AdapterMismatchError, Recipe, VideoUNet
from ei2.models import ShiftRestrictedTemporalAttention, TemporalAttention
from ei2.models.temporal import spectral_norm_of

torch.set_num_threads(2)


def tiny_unet(seed=0, sd2=False):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=(2, 4, 4, 8) if sd2 else 4, use_linear_projection=sd2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


def video(f, h=13, w=10, b=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, f, h, w, generator=g), torch.randn(b, 7, 16, generator=g)


def per_frame(unet2d, x, t, text):
    """The 2D UNet applied to each frame on its own: the reference an identity inflation must match."""
    frames = [unet2d(x[:, :, i], t, text).sample for i in range(x.shape[2])]
    return torch.stack(frames, dim=2)


def perturb_trainable(vu, scale=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vu.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def unet2d():
    return tiny_unet()


# ---- weights -----------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_2d_parameter_is_copied_exactly(unet2d, recipe):
    vu = VideoUNet.from_2d(unet2d, recipe)
    inflated = vu.unet.state_dict()
    for name, tensor in unet2d.state_dict().items():
        assert name in inflated, name
        assert torch.equal(inflated[name], tensor), name
    new = set(inflated) - set(unet2d.state_dict())
    assert new and all((".stam." in n) or (".temporal_attention." in n) for n in new)


# ---- identity at init --------------------------------------------------------------------------
def test_stam_is_identity_at_init_against_2d_frame_by_frame(unet2d):
    recipe = Recipe("self+stam", frame_attention="self", temporal="stam", group_norm="frame")
    vu = VideoUNet.from_2d(unet2d, recipe)
    x, text = video(5)
    with torch.no_grad():
        got = vu(x, 10, text).sample
        want = per_frame(unet2d, x, 10, text)
    assert (got - want).abs().max() <= 1e-5


def test_tune_a_video_on_identical_frames_equals_2d(unet2d):
    vu = VideoUNet.from_2d(unet2d, "tune-a-video")
    x, text = video(1)
    x = x.repeat(1, 1, 4, 1, 1)
    with torch.no_grad():
        got = vu(x, 10, text).sample
        want = unet2d(x[:, :, 0], 10, text).sample
    assert (got - want[:, :, None]).abs().max() <= 1e-5


@pytest.mark.parametrize("sd2", [False, True])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_on_one_frame_equals_2d(recipe, sd2):
    unet2d = tiny_unet(sd2=sd2)
    vu = VideoUNet.from_2d(unet2d, recipe)
    x, text = video(1, h=9, w=14, b=2)
    t = torch.tensor([5, 700])
    with torch.no_grad():
        got = vu(x, t, text).sample
        want = unet2d(x[:, :, 0], t, text).sample
    assert got.shape == x.shape
    assert (got[:, :, 0] - want).abs().max() <= 1e-5


def test_video_groupnorm_uses_statistics_of_all_frames(unet2d):
    """With `video` GroupNorm the frames are no longer independent; with `frame` they are."""
    x, text = video(3)
    x2 = x.clone()
    x2[:, :, 2] += 3.0  # change the last frame only
    for mode, should_change in (("frame", False), ("video", True)):
        vu = VideoUNet.from_2d(unet2d, Recipe(mode, "self", "none", group_norm=mode))
        with torch.no_grad():
            a, b = vu(x, 10, text).sample[:, :, 0], vu(x2, 10, text).sample[:, :, 0]
        assert ((a - b).abs().max() > 1e-4) == should_change, mode


# ---- frame attention against naive loops ---------------------------------------------------------
def naive_attention(attn, queries, keys):
    """softmax(Q Kᵀ/√d) V per head, written out head by head, then W_out."""
    q, k, v = attn.to_q(queries), attn.to_k(keys), attn.to_v(keys)
    d = q.shape[-1] // attn.heads
    heads = []
    for h in range(attn.heads):
        qh, kh, vh = (t[:, h * d:(h + 1) * d] for t in (q, k, v))
        scores = qh @ kh.T / math.sqrt(d)
        heads.append(torch.softmax(scores, dim=-1) @ vh)
    return attn.to_out[0](torch.cat(heads, dim=-1))


def naive_pool(tokens, h, w, s):
    """Average pooling with explicit windows; a partial window at an edge averages its valid cells."""
    grid = tokens.reshape(h, w, -1)
    cells = []
    for a in range(0, h, s):
        for b in range(0, w, s):
            cells.append(grid[a:min(a + s, h), b:min(b + s, w)].reshape(-1, grid.shape[-1]).mean(0))
    return torch.stack(cells)


def naive_keys(kind, frames, i, h, w, s):
    f = len(frames)
    if kind == "ffam":
        return torch.cat([frames[i]] + [naive_pool(frames[j], h, w, s) for j in range(f) if j != i])
    if kind == "sparse-causal":
        return frames[0] if i == 0 else torch.cat([frames[0], frames[i - 1]])
    if kind == "full":
        return torch.cat(frames)
    raise ValueError(kind)


@pytest.mark.parametrize("kind,s", [("ffam", 2), ("ffam", 3), ("sparse-causal", 2), ("full", 2)])
def test_frame_attention_matches_naive_loops_on_odd_non_square_latents(unet2d, kind, s):
    recipe = Recipe(kind, frame_attention=kind, temporal="none", coarse_factor=s)
    vu = VideoUNet.from_2d(unet2d, recipe)
    f, b = 4, 2
    x, text = video(f, h=13, w=10, b=b)
    grids, records = {}, []

    # the grid of each level, read independently from the 4-D input of each Transformer2DModel
    def grid_hook(module, args):
        grids[module] = args[0].shape[-2:]

    for m in vu.unet.modules():
        if isinstance(m, Transformer2DModel):
            m.register_forward_pre_hook(grid_hook)
            for block in m.transformer_blocks:
                block.attn1.register_forward_hook(
                    lambda mod, args, out, parent=m: records.append((mod, grids[parent], args[0], out))
                )
    with torch.no_grad():
        vu(x, 10, text)
        assert {tuple(g) for g in grids.values()} == {(13, 10), (7, 5), (4, 3), (2, 2)}
        for attn, (h, w), hidden, out in records:
            hidden = hidden.reshape(b, f, h * w, -1)
            out = out.reshape(b, f, h * w, -1)
            for bi in range(b):
                frames = list(hidden[bi])
                for i in range(f):
                    want = naive_attention(attn, frames[i], naive_keys(kind, frames, i, h, w, s))
                    assert (out[bi, i] - want).abs().max() <= 1e-5


@pytest.mark.parametrize("kind,s", [("ffam", 2), ("sparse-causal", 2)])
def test_frame_attention_with_padded_heads_matches_naive_loops(unet2d, kind, s, monkeypatch):
    """The CPU head padding (heads of 4 and 8 here) on at every level, against the same naive loops."""
    from ei2.models import frame_attention

    monkeypatch.setattr(frame_attention, "CPU_HEAD_PAD_MIN_KEYS", 0)
    widths = []
    apply = frame_attention._PaddedHeadsAttention.apply
    monkeypatch.setattr(frame_attention._PaddedHeadsAttention, "apply",
                        lambda q, *args: widths.append(q.shape[-1]) or apply(q, *args))
    test_frame_attention_matches_naive_loops_on_odd_non_square_latents(unet2d, kind, s)
    assert len(widths) == 10 and set(widths) == {4, 8}  # each of the 10 frame-attention layers ran padded


@pytest.mark.parametrize("d,keys,padded", [(4, 300, True), (8, 256, True), (8, 100, False), (16, 300, False)])
def test_padded_sdpa_equals_sdpa_in_values_gradients_and_saved_bytes(d, keys, padded):
    import torch.nn.functional as F

    from ei2.models import frame_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, d, generator=g).transpose(1, 2).requires_grad_() for n in (40, keys, keys))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b h n d) over (b n h d) memory, as the processors pass them
    grad_out = torch.randn(2, 3, 40, d, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        got = frame_attention.scaled_dot_product_attention(q, k, v, 0.37)
    assert (type(got.grad_fn).__name__ == "_PaddedHeadsAttentionBackward") == padded
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(-t.numel()) or t, lambda t: t):
        want = F.scaled_dot_product_attention(q, k, v, scale=0.37)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    assert sum(saved) == 0  # the padded path keeps the same tensors for backward as SDPA, not padded copies
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-6
    for a, b in zip(got_grads, want_grads):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5


# ---- STAM ----------------------------------------------------------------------------------------
def test_instance_centering_zero_mean_and_same_covariance():
    from ei2.models import InstanceCentering

    z = torch.randn(64, 8, 6, dtype=torch.float64) * 3 + 5  # (positions, frames, channels)
    zc = InstanceCentering()(z)
    assert zc.mean(dim=1).abs().max() <= 1e-12
    cov = lambda t: torch.einsum("pfc,pfd->cd", t - t.mean(1, keepdim=True), t - t.mean(1, keepdim=True))
    assert torch.allclose(cov(zc), cov(z), atol=1e-9)


def test_spectral_norms_stay_at_most_one_after_adamw_steps(unet2d):
    vu = VideoUNet.from_2d(unet2d, "ei2")
    params = vu.set_trainable()
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, text = video(3, h=8, w=8)
    target = torch.randn_like(x)
    stams = [m for m in vu.modules() if isinstance(m, ShiftRestrictedTemporalAttention)]
    assert len(stams) == 10
    raw_norm_before = spectral_norm_of_raw(stams[0])
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(vu(x, 500, text).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for m in stams:
            assert spectral_norm_of(m.attn.to_v) <= 1 + 1e-3
            assert spectral_norm_of(m.attn.to_out[0]) <= 1 + 1e-3
    assert spectral_norm_of_raw(stams[0]) != raw_norm_before  # the raw weights did move


def test_a_tuned_model_and_its_reloaded_adapter_predict_the_same_bits(unet2d, tmp_path):
    """After tuning, inference uses the σ of W alone (not the training's warm-started power iteration), so an
    edit right after tuning and one from the saved adapter are the same to the last bit."""
    vu = VideoUNet.from_2d(copy.deepcopy(unet2d), "ei2")
    opt = torch.optim.AdamW(vu.set_trainable(), lr=1e-2)
    x, text = video(3, h=8, w=8)
    target = torch.randn_like(x)
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(vu(x, 500, text).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vu.save_adapter(tmp_path / "adapter")
    reloaded = VideoUNet.from_2d(copy.deepcopy(unet2d), "ei2")
    reloaded.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        tuned_out, reloaded_out = vu(x, 500, text).sample, reloaded(x, 500, text).sample
    assert torch.equal(tuned_out, reloaded_out), (tuned_out - reloaded_out).abs().max()


def spectral_norm_of_raw(stam):
    raw = stam.attn.to_v.parametrizations.weight.original
    return torch.linalg.matrix_norm(raw.detach(), 2).item()


def test_stam_mean_and_covariance_shift_follow_the_seed_propositions():
    """i.i.d. Gaussian frames (seed Prop. 1): mean shift -> b_L; covariance shift <= ‖W_L‖²‖W_v‖²‖Σ(ẑ)‖ (Prop. 3)."""
    from ei2.models.context import VideoContext

    torch.manual_seed(0)
    d, f, n = 8, 6, 20000
    ctx = VideoContext()
    ctx.num_frames = f
    stam = ShiftRestrictedTemporalAttention(d, heads=2, context=ctx).double()
    with torch.no_grad():
        stam.attn.to_q.weight.normal_(0, 0.5)  # a tuned, non-uniform attention
        stam.attn.to_out[0].bias.normal_(0, 0.3)
    mu = torch.linspace(-1, 1, d, dtype=torch.float64)
    a = torch.randn(d, d, dtype=torch.float64) / math.sqrt(d)
    sigma = a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)
    z = torch.distributions.MultivariateNormal(mu, sigma).sample((n, f))  # (positions, frames, d)
    with torch.no_grad():
        out = stam_on_frames(stam, z)
    shift = out - z
    b_l = stam.attn.to_out[0].bias.detach()
    standard_error = shift.reshape(-1, d).std(0) / math.sqrt(n)  # rows of one position are correlated: use n
    assert ((shift.reshape(-1, d).mean(0) - b_l).abs() <= 5 * standard_error + 1e-6).all()

    cov = lambda t: torch.cov(t.reshape(-1, d).T)
    z_hat = z - z.mean(dim=1, keepdim=True)
    w_l, w_v = stam.attn.to_out[0].weight.detach(), stam.attn.to_v.weight.detach()
    bound = (torch.linalg.matrix_norm(w_l, 2) ** 2 * torch.linalg.matrix_norm(w_v, 2) ** 2
             * torch.linalg.matrix_norm(cov(z_hat), 2))
    covariance_shift = torch.linalg.matrix_norm(cov(out) - cov(z), 2)
    assert 0 < covariance_shift <= bound * 1.02
    assert abs(bound / torch.linalg.matrix_norm(cov(z_hat), 2) - 1) < 1e-6  # ‖W_L‖ = ‖W_v‖ = 1


def stam_on_frames(stam, z):
    """Run STAM on (positions, frames, d) given as one position per 'token': (f, n, d) is (b f) n c with b = 1."""
    n, f, d = z.shape
    hidden = z.transpose(0, 1).reshape(f, n, d)  # (b f) n c with b = 1
    return stam(hidden).reshape(f, n, d).transpose(0, 1)


@pytest.mark.parametrize("module", ["stam", "ta"])
def test_temporal_modules_equal_diffusers_attention_on_the_folded_tokens(module):
    """STAM and TA attend along frames without materialising the fold; the reference folds `(b f) n c -> (b n) f c`,
    runs the module's own diffusers Attention (its default processor) on IC(z) or LN(z), and unfolds. Outputs and
    the gradients of the input and of every parameter must agree (b = 2, so the fold is not a view)."""
    from ei2.models.context import VideoContext

    torch.manual_seed(0)
    ctx = VideoContext()
    f, n, d, b = 5, 37, 16, 2
    ctx.num_frames = f
    cls = ShiftRestrictedTemporalAttention if module == "stam" else TemporalAttention
    layer = cls(d, heads=4, context=ctx)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))  # past the zero initialisation
    x = torch.randn(b * f, n, d, requires_grad=True)
    grad_out = torch.randn(b * f, n, d)

    def grads(out):
        params = [x] + list(layer.parameters())
        return out.detach(), torch.autograd.grad(out, params, grad_out)

    got = grads(layer(x))
    z = x.reshape(b, f, n, d).transpose(1, 2).reshape(b * n, f, d)
    z_hat = layer.centering(z) if module == "stam" else layer.norm(z)
    want = grads((z + layer.attn(z_hat)).reshape(b, n, f, d).transpose(1, 2).reshape(b * f, n, d))
    assert (got[0] - want[0]).abs().max() <= 1e-5
    for g, w in zip(got[1], want[1]):
        assert (g - w).abs().max() <= 1e-5 * max(1.0, w.abs().max().item())


# ---- tuning: trainable set and gradients ---------------------------------------------------------
def block_paths(unet2d):
    """Names of the 2D UNet's transformer blocks, read from diffusers' own module tree (not from ei2)."""
    return [n for n, m in unet2d.named_modules() if isinstance(m, BasicTransformerBlock)]


def expected_trainable(unet2d, temporal):
    """The tuned tensors, written out from DESIGN §1.6 / Tune-A-Video: W_q of the frame attention and of the
    cross-attention of every block, plus all of STAM, or TA's attention without its LayerNorm (Tune-A-Video's
    `attn_temp`, not `norm_temp`). SD's attention maps have no bias; STAM's W_v and W_L are parametrised."""
    names = set()
    for p in block_paths(unet2d):
        names |= {f"{p}.attn1.to_q.weight", f"{p}.attn2.to_q.weight"}
        if temporal == "stam":
            names |= {f"{p}.stam.attn.to_q.weight", f"{p}.stam.attn.to_k.weight",
                      f"{p}.stam.attn.to_v.parametrizations.weight.original",
                      f"{p}.stam.attn.to_out.0.parametrizations.weight.original", f"{p}.stam.attn.to_out.0.bias"}
        elif temporal == "ta":
            names |= {f"{p}.temporal_attention.attn.to_q.weight", f"{p}.temporal_attention.attn.to_k.weight",
                      f"{p}.temporal_attention.attn.to_v.weight", f"{p}.temporal_attention.attn.to_out.0.weight",
                      f"{p}.temporal_attention.attn.to_out.0.bias"}
    return names


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_trainable_set_matches_recipe(unet2d, recipe):
    vu = VideoUNet.from_2d(unet2d, recipe)
    params = vu.set_trainable()
    names = {n for n, p in vu.unet.named_parameters() if p.requires_grad}
    assert len(block_paths(unet2d)) == 10
    assert names == expected_trainable(unet2d, RECIPES[recipe].temporal)
    assert len(params) == len(names) and {n for n, _ in vu.trainable_parameters()} == names


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_gradient_checkpointing_gives_the_same_nonzero_gradients(unet2d, recipe):
    x, text = video(3, h=9, w=8)
    target = torch.randn_like(x)
    grads = []
    for checkpointing in (False, True):
        vu = VideoUNet.from_2d(unet2d, recipe)
        perturb_trainable(vu)  # past step 0: zero-initialised maps pass no gradient to their neighbours
        vu.set_trainable()
        vu.train()
        if checkpointing:
            vu.enable_gradient_checkpointing()
        loss = torch.nn.functional.mse_loss(vu(x, 400, text).sample, target)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in vu.trainable_parameters()})
    plain, ckpt = grads
    assert any(n.startswith("down_blocks.") for n in ckpt)
    for name in plain:
        assert ckpt[name].abs().max() > 0, f"{name} got no gradient under checkpointing"
        rel = (ckpt[name] - plain[name]).norm() / plain[name].norm()
        assert rel <= 1e-5, (name, rel.item())


# ---- adapters --------------------------------------------------------------------------------------
def test_adapter_round_trip_is_exact_and_holds_only_trainable_tensors(unet2d, tmp_path):
    from safetensors.torch import load_file

    vu = VideoUNet.from_2d(unet2d, "ei2")
    perturb_trainable(vu)
    vu.save_adapter(tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert set(saved) == {n for n, _ in vu.trainable_parameters()}
    restored = VideoUNet.from_2d(unet2d, adapter=tmp_path / "a", recipe=None)
    fresh = VideoUNet.from_2d(unet2d, "ei2")
    x, text = video(3)
    with torch.no_grad():
        assert torch.equal(restored(x, 10, text).sample, vu(x, 10, text).sample)
        assert not torch.equal(fresh(x, 10, text).sample, vu(x, 10, text).sample)


def test_mismatched_adapter_is_refused(unet2d, tmp_path):
    vu = VideoUNet.from_2d(unet2d, "ei2")
    vu.save_adapter(tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="another base model"):
        VideoUNet.from_2d(tiny_unet(seed=5), "ei2").load_adapter(tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="recipe 'ei2'.*'tune-a-video'"):
        VideoUNet.from_2d(unet2d, "tune-a-video").load_adapter(tmp_path / "a")
    # the same base weights in another dtype are the same base model
    VideoUNet.from_2d(copy.deepcopy(unet2d).half(), "ei2").load_adapter(tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="not an ei2 adapter"):
        vu.load_adapter(tmp_path / "missing")


def test_ta_zero_initialised_output_and_frozen_norm(unet2d):
    """TA's output linear starts at zero (weight and bias); its LayerNorm is frozen, as in Tune-A-Video: it gets
    no gradient and keeps nn.LayerNorm's initial values (weight 1, bias 0) through tuning steps that move TA's
    attention."""
    vu = VideoUNet.from_2d(unet2d, "tune-a-video")
    tas = [m for m in vu.modules() if isinstance(m, TemporalAttention)]
    assert len(tas) == 10
    for ta in tas:
        assert not ta.attn.to_out[0].weight.any() and not ta.attn.to_out[0].bias.any()
        assert ta.attn.to_q.weight.any()
    perturb_trainable(vu)  # past step 0, so that gradients reach TA's input side and its norm would move if tuned
    params = vu.set_trainable()
    vu.train()
    before = {id(ta): ta.attn.to_q.weight.detach().clone() for ta in tas}
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, text = video(3, h=8, w=8)
    target = torch.randn_like(x)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(vu(x, 500, text).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for ta in tas:
        dim = ta.norm.normalized_shape[0]
        assert not ta.norm.weight.requires_grad and not ta.norm.bias.requires_grad
        assert ta.norm.weight.grad is None and ta.norm.bias.grad is None
        assert torch.equal(ta.norm.weight, torch.ones(dim)) and torch.equal(ta.norm.bias, torch.zeros(dim))
        assert not torch.equal(ta.attn.to_q.weight, before[id(ta)])  # TA's attention did move


def naive_tav_temporal(hidden, tav, prefix, heads, num_frames):
    """Tune-A-Video's temporal step of one block, from its own tensors by their own names:
    h = attn_temp(norm_temp(h)) + h over the frames of each position, `(b f) n c -> (b n) f c`, head by head."""
    x = hidden.reshape(-1, num_frames, hidden.shape[1], hidden.shape[2]).transpose(1, 2)  # b n f c
    ln = torch.nn.functional.layer_norm(x, x.shape[-1:], tav[f"{prefix}.norm_temp.weight"],
                                        tav[f"{prefix}.norm_temp.bias"], eps=1e-5)
    q, k, v = (ln @ tav[f"{prefix}.attn_temp.{m}.weight"].T for m in ("to_q", "to_k", "to_v"))
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        out.append(torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(d), dim=-1) @ v[..., s])
    out = torch.cat(out, -1) @ tav[f"{prefix}.attn_temp.to_out.0.weight"].T + tav[f"{prefix}.attn_temp.to_out.0.bias"]
    return (out + x).transpose(1, 2).reshape(hidden.shape)


def test_tune_a_video_weights_load_by_their_own_names(unet2d):
    """A state dict in Tune-A-Video's naming loads into the `tune-a-video` recipe. Its names are written here from
    Tune-A-Video's model (diffusers' names for the 2D parts; `attn_temp` and `norm_temp` in every transformer
    block), not by renaming ei2's, and every block's temporal step is checked against Tune-A-Video's formula."""
    g = torch.Generator().manual_seed(11)
    tav = dict(tiny_unet(seed=9).state_dict())  # Tune-A-Video's 2D tensors: another 2D UNet's values
    dims = {}
    for p in block_paths(unet2d):
        dim = unet2d.get_submodule(p).norm1.normalized_shape[0]
        dims[p] = dim
        for m in ("to_q", "to_k", "to_v", "to_out.0"):
            tav[f"{p}.attn_temp.{m}.weight"] = 0.3 * torch.randn(dim, dim, generator=g)
        tav[f"{p}.attn_temp.to_out.0.bias"] = 0.1 * torch.randn(dim, generator=g)
        tav[f"{p}.norm_temp.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        tav[f"{p}.norm_temp.bias"] = 0.1 * torch.randn(dim, generator=g)
    target = VideoUNet.from_2d(unet2d, "tune-a-video")
    target.load_tune_a_video(tav)
    inflated = target.unet.state_dict()
    for name, tensor in tiny_unet(seed=9).state_dict().items():  # the 2D tensors, by diffusers' names
        assert torch.equal(inflated[name], tensor), name
    seen = {}
    for p in block_paths(unet2d):
        block = target.unet.get_submodule(p)
        block.temporal.register_forward_hook(lambda m, args, out, p=p: seen.update({p: (args[0], out)}))
    x, text = video(3)
    with torch.no_grad():
        target(x, 10, text)
    assert set(seen) == set(dims)
    for p, (hidden, out) in seen.items():
        heads = unet2d.get_submodule(p).attn1.heads
        torch.testing.assert_close(out, naive_tav_temporal(hidden, tav, p, heads, 3), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        target.load_tune_a_video({k: v for k, v in tav.items() if "attn_temp" not in k})


# ---- diffusers model conventions ---------------------------------------------------------------------
def public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("recipe", ["ei2", "tune-a-video"])
def test_save_pretrained_round_trip_gives_the_same_model_config_and_adapters(unet2d, recipe, tmp_path):
    import json

    vu = VideoUNet.from_2d(unet2d, recipe, init_seed=7)
    vu.set_trainable()
    perturb_trainable(vu)  # a tuned model: its tuned 2D tensors are no longer the pretrained ones
    vu.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "pretrained_values.safetensors"]
    # the config on disk, against values known here: the recipe, the 2D UNet's config, the seed
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["_class_name"] == "VideoUNet"
    assert Recipe.from_dict(saved["recipe"]) == RECIPES[recipe]
    assert {k: saved["unet_config"][k] for k in ("block_out_channels", "cross_attention_dim", "sample_size")} == {
        "block_out_channels": [16, 16, 32, 32], "cross_attention_dim": 16, "sample_size": 16}
    assert saved["init_seed"] == 7

    loaded = VideoUNet.from_pretrained(tmp_path / "model")
    assert isinstance(loaded, VideoUNet) and not loaded.training
    assert public(loaded.config) == public(vu.config)
    assert loaded.recipe == RECIPES[recipe] and loaded.base_fingerprint == vu.base_fingerprint
    assert (loaded.dtype, loaded.device) == (torch.float32, torch.device("cpu"))
    a, b = vu.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # every tensor, bit for bit
    x, text = video(3)
    with torch.no_grad():
        want, got = vu(x, 10, text).sample, loaded(x, 10, text).sample
    if RECIPES[recipe].temporal == "stam":
        # STAM's σ is recomputed from the loaded weights (exact SVD) where the saved model warm-started its
        # power iteration: the same normalised maps to ~1e-7
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    else:
        assert torch.equal(got, want)
    # the pretrained 2D UNet is still known: base_state_dict gives its tensors, not the tuned ones
    base = loaded.base_state_dict()
    assert base.keys() == unet2d.state_dict().keys()
    assert all(torch.equal(base[k], v) for k, v in unet2d.state_dict().items())
    # a loaded model's adapter: it loads into a fresh inflation of the same base and rebuilds the model
    loaded.save_adapter(tmp_path / "adapter")
    rebuilt = VideoUNet.from_2d(unet2d, recipe, adapter=tmp_path / "adapter", init_seed=7)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, 10, text).sample, want)
    loaded.load_adapter(tmp_path / "adapter")  # its base fingerprint is the pretrained model's, from the config
    with pytest.raises(AdapterMismatchError, match="another base model"):
        VideoUNet.from_2d(tiny_unet(seed=5), recipe).load_adapter(tmp_path / "adapter")
    # diffusers' .to() and dtype
    assert loaded.to(torch.float64).dtype == torch.float64
    # from the config alone: the same architecture and tensor names (random 2D weights, as diffusers builds)
    fresh = VideoUNet.from_config(loaded.config)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in a.items()}
    assert fresh.recipe == RECIPES[recipe]


def test_an_untuned_save_has_no_pretrained_values_file_and_pickle_is_refused(unet2d, tmp_path):
    vu = VideoUNet.from_2d(unet2d, "ei2")
    vu.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with pytest.raises(ValueError, match="safetensors only"):
        vu.save_pretrained(tmp_path / "p", safe_serialization=False)
