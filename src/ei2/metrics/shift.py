"""Covariate shift of the modules an inflated UNet adds or re-wires (seed A.2–A.5, DESIGN §2).

Every measured module is residual, `out = z + W_L·Attention(ẑ, c) + b_L` (seed eq. 3), with ẑ its
normalised input and c the rows its keys and values come from:

- temporal modules, rows `(b h w) f c`: STAM (seed eq. 19, ẑ = IC(z), c = ẑ) and TA (seed eq. 18,
  ẑ = LN(z), c = ẑ);
- frame attention (`attn1`, the self-attention replaced by FFAM / sparse-causal / full): ẑ = norm1(z),
  c = the frame's keys built by its processor (`frame_context`);
- cross-attention (`attn2`): ẑ = norm2(z), c = the text embeddings.

For each, on the rows of z (every position of every frame, pooled) this measures the mean shift
‖µ′−µ‖₂ and the covariance shift ‖Σ′−Σ‖ (spectral and Frobenius) that the module adds, with ‖Σ(z)‖
beside them; ω_{Q,K} = ‖Mⁱ‖₂² per query row and head (Prop. 1, eq. 8), recomputed from the module's own
weights on the hooked input as softmax(QKᵀ/√d), which lies in [1/m, 1] for m keys (m = f for temporal
modules); the closed forms of Prop. 1 (ii), µ′−µ = W_Lᵀµ(V) + b_L and Σ′−Σ = ω W_LᵀΣ(V)W_L (with ω per
pair of heads, ω_{hg} = mean_i Σ_j M^h_ij M^g_ij, which is ω for one head); and the bound of Prop. 3,
‖Σ′−Σ‖ ≤ ‖W_L‖₂²‖W_v‖₂²‖Σ(ẑ)‖, with whether the measured shift obeys it.

Prop. 1 assumes the attended values are independent of the residual z and of the attention weights.
That holds for cross-attention on an independent c, not for the temporal modules, whose values are
made of the same rows as z (and STAM's centred values sum to zero over the frames): there the measured
shift is the quantity of interest, and the closed form is reported beside it, not instead of it.
With Δ = out − z the branch, Σ′−Σ = Cov(Δ) + Cov(z, Δ) + Cov(Δ, z): Prop. 1 models Cov(Δ) (as
ω W_LᵀΣ(V)W_L) and drops the cross term, which is first order in W_L where Cov(Δ) and the bounds of
Prop. 2–3 are second order. So both are checked: `prop3_holds` on the measured ‖Σ′−Σ‖ and
`prop3_holds_branch` on ‖Cov(Δ)‖ (the same for Prop. 2). A zero-initialised output map that has
moved little (TA early in tuning) can break the first while keeping the second.

Prop. 2 (tuning W_q): given the untuned query weights, each hooked module whose W_q moved is run
again on the same input with the untuned W_q (all its other weights as they are), and the change of
Σ′ this causes is compared with the bound of eq. 16, summed over heads h:
    ‖Σ′_tuned − Σ′‖ ≤ Σ_h 2λ ‖ΔW_q^h‖₂ max_i‖ẑ_i‖₂ max‖K^h‖₂ ‖W_L^hᵀ Σ(V^h) W_L^h‖₂,   λ = 1/√d.
Lemma 1 gives the factor 2λ = 2/√d; the seed's eq. 15–16 apply λ twice and print 2/d, which is
reported as `prop2_bound_seed`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from einops import rearrange

from ..files import atomic_path

KINDS = ("temporal", "frame", "cross")
FRAME_ATTENTION_NAMES = {
    "SparseCausalAttention": "SCA", "FineCoarseFrameAttention": "FFAM", "FullFrameAttention": "full",
}

# columns of the table: (key, header, format)
TABLE_COLUMNS = (
    ("recipe", "recipe", "{}"),
    ("state", "state", "{}"),
    ("timestep", "t", "{}"),
    ("layer", "layer", "{}"),
    ("module", "module", "{}"),
    ("mean_shift", "‖µ′−µ‖", "{:.3g}"),
    ("cov_shift_spectral", "‖Σ′−Σ‖₂", "{:.3g}"),
    ("cov_shift_frobenius", "‖Σ′−Σ‖F", "{:.3g}"),
    ("branch_cov_spectral", "‖Cov(Δ)‖₂", "{:.3g}"),
    ("var_shift", "Δvar", "{:.3g}"),
    ("sigma_z_spectral", "‖Σ(z)‖₂", "{:.3g}"),
    ("omega_mean", "ω mean", "{:.3f}"),
    ("omega_range", "ω [min,max]", "{}"),
    ("prop3_bound", "Prop3 bound", "{:.3g}"),
    ("prop3_holds", "holds", "{}"),
    ("prop3_holds_branch", "Δ holds", "{}"),
)
ADAPTER_COLUMNS = (
    ("wq_delta", "‖ΔW_q‖₂", "{:.3g}"),
    ("cov_change_from_wq", "‖ΔΣ′‖₂ (W_q)", "{:.3g}"),
    ("prop2_bound", "Prop2 bound", "{:.3g}"),
    ("prop2_holds", "holds2", "{}"),
    ("prop2_holds_branch", "Δ holds2", "{}"),
)


def _cov(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and covariance (d, d) of rows (N, d), in float64 (divisor N - 1)."""
    rows = rows.reshape(-1, rows.shape[-1]).double()
    mean = rows.mean(0)
    centred = rows - mean
    return mean, centred.T @ centred / max(rows.shape[0] - 1, 1)


def _spectral(m: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(m.double(), ord=2).item()


def _frobenius(m: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(m.double(), ord="fro").item()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def _attend(attn, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: int):
    """Per-head attention probabilities softmax(λ QKᵀ) in chunks of the batch.

    Returns ω (b, h, n), the head-pair sums Σ_i Σ_j M^h_ij M^g_ij (h, h), and the attended values (b, n, h·d).
    """
    heads = attn.heads
    omegas, attended = [], []
    pair = torch.zeros(heads, heads, dtype=torch.float64, device=queries.device)
    for start in range(0, queries.shape[0], chunk):
        q = _heads(queries[start:start + chunk], heads).double()
        k = _heads(keys[start:start + chunk], heads).double()
        v = _heads(values[start:start + chunk], heads).double()
        probs = torch.softmax(attn.scale * q @ k.transpose(-1, -2), dim=-1)  # b h n m
        omegas.append((probs ** 2).sum(-1))
        pair += torch.einsum("bhnm,bgnm->hg", probs, probs)
        attended.append(rearrange(probs @ v, "b h n d -> b n (h d)"))
    return torch.cat(omegas), pair, torch.cat(attended)


def _query_subset(n: int, max_queries: int | None) -> torch.Tensor | slice:
    if max_queries is None or n <= max_queries:
        return slice(None)
    return torch.linspace(0, n - 1, max_queries).round().long()


@torch.no_grad()
def residual_attention_shift(
    z: torch.Tensor,
    z_hat: torch.Tensor,
    context: torch.Tensor,
    attn,
    out: torch.Tensor,
    base_query_weight: torch.Tensor | None = None,
    max_queries: int | None = 1024,
    omega_samples: int = 2000,
) -> dict:
    """Shift statistics of one residual attention module `out = z + attn(z_hat, context)` (seed eq. 3).

    z, z_hat, out: (B, n, c) rows grouped as the module attends (one group of queries per batch entry);
    context: (B, m, c_kv) the rows its keys and values are made from; attn: a diffusers `Attention`
    (to_q, to_k, to_v, to_out[0], heads, scale). `max_queries` caps the query rows per group used for
    ω and the recomputations (evenly spaced); the mean and covariance shifts use every row.
    Returns a dict of plain numbers plus `omega_samples` (a 1-D tensor for plots).
    """
    c = z.shape[-1]
    mu, sigma = _cov(z)
    mu_out, sigma_out = _cov(out)
    _, sigma_hat = _cov(z_hat)
    delta = sigma_out - sigma
    # Σ′−Σ = Cov(Δ) + Cov(z, Δ) + Cov(Δ, z) with Δ = out − z the branch: Prop. 1 models Cov(Δ) only
    _, sigma_branch = _cov(out - z)
    cross = delta - sigma_branch

    # attention probabilities recomputed from the module's weights, on (a subset of) its query rows
    pick = _query_subset(z.shape[1], max_queries)
    zq, zhq, outq = z[:, pick], z_hat[:, pick], out[:, pick]
    keys, values = attn.to_k(context), attn.to_v(context)
    heads, m = attn.heads, context.shape[1]
    chunk = max(1, int(2 ** 24 // max(1, heads * zq.shape[1] * m)))
    omega, pair, attended = _attend(attn, attn.to_q(zhq), keys, values, chunk)
    rows_q = omega.shape[0] * omega.shape[2]
    w_l = attn.to_out[0].weight.detach().double()  # (c, h·d): Linear(x) = x W_Lᵀ + b_L in torch terms
    b_l = attn.to_out[0].bias
    b_l = torch.zeros(c, dtype=torch.float64, device=z.device) if b_l is None else b_l.detach().double()
    w_v = attn.to_v.weight.detach().double()
    branch = attended @ w_l.T + b_l
    recompute_error = ((zq.double() + branch) - outq.double()).abs().max().item()
    scale_out = max(outq.double().abs().max().item(), 1e-12)

    # Prop. 1 (ii): closed forms from µ(V), Σ(V) and ω per head pair
    mu_v, sigma_v = _cov(values)
    head_dim = sigma_v.shape[0] // heads
    omega_pairs = pair / rows_q
    omega_full = torch.kron(omega_pairs, torch.ones(head_dim, head_dim, dtype=torch.float64, device=z.device))
    predicted_mean = mu_v @ w_l.T + b_l
    predicted_cov = w_l @ (omega_full * sigma_v) @ w_l.T

    w_l_norm, w_v_norm = _spectral(w_l), _spectral(w_v)
    sigma_hat_norm = _spectral(sigma_hat)
    bound = w_l_norm ** 2 * w_v_norm ** 2 * sigma_hat_norm
    cov_shift = _spectral(delta)
    flat = omega.flatten()
    step = max(1, flat.numel() // omega_samples)
    result = {
        "rows": z.numel() // c,
        "keys": m,
        "heads": heads,
        "mean_shift": (mu_out - mu).norm().item(),
        "cov_shift_spectral": cov_shift,
        "cov_shift_frobenius": _frobenius(delta),
        "var_shift": delta.diagonal().abs().mean().item(),
        "branch_cov_spectral": _spectral(sigma_branch),
        "cross_cov_spectral": _spectral(cross),
        "variance_z": sigma.diagonal().mean().item(),
        "sigma_z_spectral": _spectral(sigma),
        "sigma_z_frobenius": _frobenius(sigma),
        "sigma_zhat_spectral": sigma_hat_norm,
        "omega_mean": flat.mean().item(),
        "omega_min": flat.min().item(),
        "omega_median": flat.median().item(),
        "omega_max": flat.max().item(),
        "omega_lower": 1.0 / m,
        "w_l_spectral": w_l_norm,
        "w_v_spectral": w_v_norm,
        "b_l_norm": b_l.norm().item(),
        "prop1_mean_shift": (predicted_mean).norm().item(),
        "prop1_cov_shift_spectral": _spectral(predicted_cov),
        "prop3_bound": bound,
        "prop3_ratio": cov_shift / bound if bound > 0 else math.inf if cov_shift > 0 else 0.0,
        "prop3_holds": cov_shift <= bound * (1 + 1e-6) + 1e-12,
        "prop3_holds_branch": _spectral(sigma_branch) <= bound * (1 + 1e-6) + 1e-12,
        "recompute_error": recompute_error / scale_out,  # relative to max |out|: ~1e-7 in fp32
        "omega_samples": flat[::step].float().cpu(),
    }

    if base_query_weight is not None:
        result.update(_query_tuning_shift(
            attn, zq, zhq, keys, values, omega, branch, w_l, b_l, sigma_v, base_query_weight, chunk))
    return result


def _query_tuning_shift(attn, zq, zhq, keys, values, omega, branch, w_l, b_l, sigma_v, base_weight, chunk) -> dict:
    """Prop. 2: the same input through the untuned W_q; Σ′ change and the bound of eq. 16 (per head, summed)."""
    tuned_weight = attn.to_q.weight.detach().double()
    base_weight = base_weight.to(tuned_weight)
    diff = tuned_weight - base_weight  # (h·d, c): rows of head h are h·d .. (h+1)·d
    heads = attn.heads
    head_dim = diff.shape[0] // heads
    base_queries = zhq.double() @ base_weight.T
    omega_base, _, attended_base = _attend(attn, base_queries, keys.double(), values.double(), chunk)
    branch_base = attended_base @ w_l.T + b_l
    _, sigma_tuned = _cov(zq.double() + branch)
    _, sigma_base = _cov(zq.double() + branch_base)
    change_branch = _spectral(_cov(branch)[1] - _cov(branch_base)[1])
    z_row_norm = zhq.double().norm(dim=-1).max().item()
    k = _heads(keys.double(), heads)  # b h m d
    bound = bound_seed = 0.0
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        k_norm = torch.linalg.matrix_norm(k[:, h], ord=2).max().item()
        w_lh = w_l[:, rows]
        value_term = _spectral(w_lh @ sigma_v[rows, rows] @ w_lh.T)
        core = _spectral(diff[rows]) * z_row_norm * k_norm * value_term
        bound += 2 * attn.scale * core
        bound_seed += 2 * attn.scale ** 2 * core
    change = _spectral(sigma_tuned - sigma_base)
    return {
        "wq_delta": _spectral(diff),
        "wq_delta_frobenius": _frobenius(diff),
        "omega_change": (omega - omega_base).abs().mean().item(),
        "cov_change_from_wq": change,
        "prop2_bound": bound,
        "prop2_bound_seed": bound_seed,
        "prop2_holds": change <= bound * (1 + 1e-6) + 1e-12,
        "cov_change_from_wq_branch": change_branch,
        "prop2_holds_branch": change_branch <= bound * (1 + 1e-6) + 1e-12,
    }


@torch.no_grad()
def temporal_shift(module, hidden_states: torch.Tensor, output: torch.Tensor,
                   base_query_weight: torch.Tensor | None = None, max_queries: int | None = 1024) -> dict:
    """`residual_attention_shift` of a temporal module (STAM or TA) from its input and output `(b f) n c`.

    The rows are regrouped as the module attends, `(b f) n c -> (b n) f c`; ẑ = IC(z) for STAM, LN(z) for TA.
    """
    f = module.context.num_frames
    z = rearrange(hidden_states, "(b f) n c -> (b n) f c", f=f)
    out = rearrange(output, "(b f) n c -> (b n) f c", f=f)
    z_hat = module.centering(z) if hasattr(module, "centering") else module.norm(z)
    return residual_attention_shift(z, z_hat, z_hat, module.attn, out, base_query_weight, max_queries=max_queries)


# ------------------------------------------------------------------------------------------------ hooks
def short_layer_name(path: str) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0` -> `down1.0`; `mid_block…` -> `mid`; a 2nd block -> `.b1`."""
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)", path)
    if m:
        name = f"{m[1]}{m[2]}.{m[3]}"
        block = int(m[4])
    else:
        m = re.fullmatch(r"mid_block\.attentions\.(\d+)\.transformer_blocks\.(\d+)", path)
        if not m:
            return path
        name = "mid" if m[1] == "0" else f"mid.{m[1]}"
        block = int(m[2])
    return name if block == 0 else f"{name}.b{block}"


@dataclass
class _Slot:
    z: torch.Tensor | None = None
    z_hat: torch.Tensor | None = None


@dataclass
class ShiftProbe:
    """Forward hooks on every temporal module, frame attention and cross-attention of a `VideoUNet`.

    Use as a context manager around forward passes; set `tags` (e.g. `{"timestep": 500}`) before each
    pass; every hooked call appends one record (a dict) to `records`.

        with ShiftProbe(video_unet) as probe:
            probe.tags = {"timestep": 500}
            video_unet(latents, 500, text)
        probe.records

    `base_query_weights`: `{attention module path: untuned W_q}` (paths relative to `video_unet.unet`,
    e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1`); the modules whose W_q differs from it
    also get the Prop. 2 columns.
    """

    unet: torch.nn.Module
    kinds: tuple[str, ...] = KINDS
    base_query_weights: dict[str, torch.Tensor] | None = None
    max_queries: int | None = 1024
    tags: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def __post_init__(self):
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown module kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
        self._handles = []

    def blocks(self):
        from ..models.video_unet import VideoTransformerBlock

        root = getattr(self.unet, "unet", self.unet)
        return [(path, m) for path, m in root.named_modules() if isinstance(m, VideoTransformerBlock)]

    def __enter__(self) -> "ShiftProbe":
        blocks = self.blocks()
        if not blocks:
            raise ValueError("no VideoTransformerBlock in this model: analyse a VideoUNet (VideoUNet.from_2d)")
        for path, block in blocks:
            layer = short_layer_name(path)
            if "temporal" in self.kinds and block.temporal is not None:
                attn_path = f"{path}.{block.temporal_name}.attn"
                self._handles.append(block.temporal.register_forward_hook(self._temporal_hook(layer, attn_path)))
            for kind, norm, attn, suffix in (("frame", block.norm1, block.attn1, "attn1"),
                                             ("cross", block.norm2, block.attn2, "attn2")):
                if kind not in self.kinds:
                    continue
                slot = _Slot()
                self._handles.append(norm.register_forward_hook(self._norm_hook(slot)))
                self._handles.append(attn.register_forward_hook(
                    self._attention_hook(layer, kind, f"{path}.{suffix}", slot), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _base(self, attn_path: str, attn) -> torch.Tensor | None:
        if not self.base_query_weights or attn_path not in self.base_query_weights:
            return None
        base = self.base_query_weights[attn_path]
        if torch.equal(base.to(attn.to_q.weight), attn.to_q.weight.detach()):
            return None
        return base

    def _record(self, layer, kind, module, attn_path, stats):
        self.records.append({**self.tags, "layer": layer, "module": module, "kind": kind, "path": attn_path, **stats})

    def _temporal_hook(self, layer, attn_path):
        def hook(module, inputs, output):
            stats = temporal_shift(module, inputs[0], output, self._base(attn_path, module.attn), self.max_queries)
            self._record(layer, "temporal", "STAM" if hasattr(module, "centering") else "TA", attn_path, stats)
        return hook

    @staticmethod
    def _norm_hook(slot):
        def hook(module, inputs, output):
            slot.z, slot.z_hat = inputs[0], output
        return hook

    def _attention_hook(self, layer, kind, attn_path, slot):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            if slot.z is None or slot.z_hat is not hidden:
                raise RuntimeError(f"{attn_path}: its input is not the output of the norm before it; cannot measure")
            z, z_hat = slot.z, slot.z_hat
            slot.z = slot.z_hat = None
            if kind == "cross":
                context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                name = "CA"
            else:
                frame_context = getattr(module.processor, "frame_context", None)
                context = frame_context(hidden) if frame_context is not None else hidden
                name = FRAME_ATTENTION_NAMES.get(type(module.processor).__name__, "SA")
            with torch.no_grad():
                stats = residual_attention_shift(z, z_hat, context, module, z + output, self._base(attn_path, module),
                                                 max_queries=self.max_queries)
            self._record(layer, kind, name, attn_path, stats)
        return hook


def base_query_weights(video_unet) -> dict[str, torch.Tensor]:
    """`{attention path: W_q}` of every tuned query map of a VideoUNet (for `ShiftProbe`), detached copies."""
    suffix = ".to_q.weight"
    return {name[: -len(suffix)]: p.detach().clone() for name, p in video_unet.trainable_parameters()
            if name.endswith(suffix)}


@torch.no_grad()
def analyze_shift(video_unet, latents: torch.Tensor, text: torch.Tensor, timesteps, scheduler, seed: int = 0,
                  kinds: tuple[str, ...] = KINDS, base_query_weights: dict | None = None,
                  max_queries: int | None = 1024, tags: dict | None = None) -> list[dict]:
    """Noise `latents` (b, c, f, h, w) at each timestep (`scheduler.add_noise`, noise from `seed`, the same for
    every model given the same seed), run `video_unet` with a `ShiftProbe` and return its records."""
    records = []
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    was_training = video_unet.training
    video_unet.eval()
    try:
        with ShiftProbe(video_unet, kinds, base_query_weights, max_queries) as probe:
            for t in timesteps:
                probe.tags = {**(tags or {}), "timestep": int(t)}
                t_tensor = torch.tensor([int(t)], device=latents.device)
                noisy = scheduler.add_noise(latents, noise, t_tensor)
                video_unet(noisy, t_tensor.expand(latents.shape[0]), text)
            records = probe.records
    finally:
        video_unet.train(was_training)
    return records


# ------------------------------------------------------------------------------------------------ reports
def _cell(record: dict, key: str, fmt: str) -> str:
    if key == "omega_range":
        if "omega_min" not in record:
            return ""
        return f"[{record['omega_min']:.3f},{record['omega_max']:.3f}]"
    value = record.get(key)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return fmt.format(value)


def table_columns(records: list[dict]) -> tuple:
    columns = TABLE_COLUMNS
    if any("wq_delta" in r for r in records):
        columns = columns + ADAPTER_COLUMNS
    return columns


def format_table(records: list[dict], markdown: bool = False) -> str:
    """A fixed-width text table (or a markdown table) of the main columns."""
    columns = table_columns(records)
    header = [h for _, h, _ in columns]
    rows = [[_cell(r, k, f) for k, _, f in columns] for r in records]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


CSV_FIELDS = (
    "recipe", "state", "timestep", "layer", "module", "kind", "path", "rows", "keys", "heads",
    "mean_shift", "cov_shift_spectral", "cov_shift_frobenius", "branch_cov_spectral", "cross_cov_spectral",
    "var_shift", "variance_z",
    "sigma_z_spectral", "sigma_z_frobenius", "sigma_zhat_spectral",
    "omega_mean", "omega_min", "omega_median", "omega_max", "omega_lower",
    "w_l_spectral", "w_v_spectral", "b_l_norm", "prop1_mean_shift", "prop1_cov_shift_spectral",
    "prop3_bound", "prop3_ratio", "prop3_holds", "prop3_holds_branch", "recompute_error",
    "wq_delta", "wq_delta_frobenius", "omega_change", "cov_change_from_wq", "cov_change_from_wq_branch",
    "prop2_bound", "prop2_bound_seed", "prop2_holds", "prop2_holds_branch",
)


def to_csv(records: list[dict]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in CSV_FIELDS})
    return buffer.getvalue()


def summarize(records: list[dict]) -> list[dict]:
    """Per (recipe, state, kind): mean over layers and timesteps of the main shifts, and Prop. 3/2 verdicts."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("recipe", ""), r.get("state", ""), r["kind"], r["module"]), []).append(r)
    out = []
    for (recipe, state, kind, module), rs in groups.items():
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        row = {
            "recipe": recipe, "state": state, "kind": kind, "module": module, "n": len(rs),
            "mean_shift": mean("mean_shift"), "cov_shift_spectral": mean("cov_shift_spectral"),
            "var_shift": mean("var_shift"), "variance_z": mean("variance_z"),
            "sigma_z_spectral": mean("sigma_z_spectral"), "omega_mean": mean("omega_mean"),
            "branch_cov_spectral": mean("branch_cov_spectral"),
            "max_prop3_ratio": max(r["prop3_ratio"] for r in rs),
            "prop3_holds": f"{sum(bool(r['prop3_holds']) for r in rs)}/{len(rs)}",
            "prop3_holds_branch": f"{sum(bool(r['prop3_holds_branch']) for r in rs)}/{len(rs)}",
        }
        tuned = [r for r in rs if "prop2_holds" in r]
        if tuned:
            row["prop2_holds"] = f"{sum(bool(r['prop2_holds']) for r in tuned)}/{len(tuned)}"
            row["prop2_holds_branch"] = f"{sum(bool(r['prop2_holds_branch']) for r in tuned)}/{len(tuned)}"
        out.append(row)
    return out


def format_summary(summary: list[dict], markdown: bool = False) -> str:
    columns = [("recipe", "{}"), ("state", "{}"), ("kind", "{}"), ("module", "{}"), ("n", "{}"),
               ("mean_shift", "{:.3g}"), ("cov_shift_spectral", "{:.3g}"), ("branch_cov_spectral", "{:.3g}"),
               ("var_shift", "{:.3g}"),
               ("variance_z", "{:.3g}"), ("sigma_z_spectral", "{:.3g}"), ("omega_mean", "{:.3f}"),
               ("max_prop3_ratio", "{:.3g}"), ("prop3_holds", "{}"), ("prop3_holds_branch", "{}"),
               ("prop2_holds", "{}"), ("prop2_holds_branch", "{}")]
    headers = {"mean_shift": "‖µ′−µ‖", "cov_shift_spectral": "‖Σ′−Σ‖₂", "var_shift": "Δvar",
               "branch_cov_spectral": "‖Cov(Δ)‖₂", "prop3_holds_branch": "Prop3 (Cov(Δ))",
               "prop2_holds_branch": "Prop2 (Cov(Δ))",
               "variance_z": "var(z)", "sigma_z_spectral": "‖Σ(z)‖₂", "omega_mean": "ω mean",
               "max_prop3_ratio": "max shift/bound", "prop3_holds": "Prop3 holds", "prop2_holds": "Prop2 holds"}
    records = [{k: (f.format(r[k]) if k in r else "") for k, f in columns} for r in summary]
    names = [headers.get(k, k) for k, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r[k] for k, _ in columns) + " |" for r in records])
    widths = [max(len(n), *(len(r[k]) for r in records)) for n, (k, _) in zip(names, columns)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(r[k].ljust(w) for (k, _), w in zip(columns, widths)) for r in records])


def plot_shift(records: list[dict], path, title: str = "") -> None:
    """Shift by layer, one column per recipe (TA against STAM side by side), written atomically as PNG.

    Rows: covariance shift ‖Σ′−Σ‖₂ of each module kind and state (with ‖Σ(z)‖₂ and the Prop. 3 bound of
    the temporal module), mean shift ‖µ′−µ‖, and the distribution of ω of the temporal module.
    Values are averaged over timesteps; the y axes are logarithmic (zeros drawn at 1e-10).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(dict.fromkeys(r["recipe"] for r in records))
    states = list(dict.fromkeys(r["state"] for r in records))
    fig, axes = plt.subplots(3, len(recipes), figsize=(5.5 * len(recipes) + 2, 10), sharey="row", squeeze=False)
    floor = 1e-10
    styles = {"temporal": "-", "frame": "--", "cross": ":"}
    colours = {s: c for s, c in zip(states, ("tab:blue", "tab:orange", "tab:green", "tab:red"))}
    for col, recipe in enumerate(recipes):
        rs = [r for r in records if r["recipe"] == recipe]
        layers = list(dict.fromkeys(r["layer"] for r in rs))
        x = range(len(layers))

        def series(kind, state, key):
            values = []
            for layer in layers:
                sel = [r[key] for r in rs if r["kind"] == kind and r["state"] == state and r["layer"] == layer]
                values.append(max(sum(sel) / len(sel), floor) if sel else float("nan"))
            return values

        for state in states:
            for kind in KINDS:
                if not any(r["kind"] == kind and r["state"] == state for r in rs):
                    continue
                module = next(r["module"] for r in rs if r["kind"] == kind)
                label = f"{module} ({state})"
                axes[0, col].plot(x, series(kind, state, "cov_shift_spectral"), styles[kind], marker="o",
                                  color=colours[state], label=label)
                axes[1, col].plot(x, series(kind, state, "mean_shift"), styles[kind], marker="o",
                                  color=colours[state], label=label)
            if any(r["kind"] == "temporal" and r["state"] == state for r in rs):
                axes[0, col].plot(x, series("temporal", state, "prop3_bound"), linestyle="none", marker="_",
                                  markersize=14, color=colours[state], label=f"Prop. 3 bound ({state})")
        if any(r["kind"] == "temporal" for r in rs):
            axes[0, col].plot(x, series("temporal", states[0], "sigma_z_spectral"), color="gray", alpha=0.6,
                              label="‖Σ(z)‖₂ at temporal input")
            data, positions, box_colours = [], [], []
            for i, layer in enumerate(layers):
                for j, state in enumerate(states):
                    sel = [r["omega_samples"] for r in rs if r["kind"] == "temporal" and r["state"] == state
                           and r["layer"] == layer]
                    if sel:
                        data.append(torch.cat(sel).numpy())
                        positions.append(i + (j - (len(states) - 1) / 2) * 0.3)
                        box_colours.append(colours[state])
            parts = axes[2, col].boxplot(data, positions=positions, widths=0.25, showfliers=False, patch_artist=True)
            for patch, colour in zip(parts["boxes"], box_colours):
                patch.set_facecolor(colour)
                patch.set_alpha(0.5)
            frames = next(r["keys"] for r in rs if r["kind"] == "temporal")
            axes[2, col].axhline(1 / frames, color="gray", linestyle=":", label=f"1/f = {1 / frames:.3g} (uniform)")
            top = max([float(d.max()) for d in data] + [1 / frames])
            axes[2, col].set_ylim(1 / frames - 0.02 * (top - 1 / frames) - 1e-4, top + 0.05 * (top - 1 / frames) + 1e-4)
            axes[2, col].legend(fontsize=7, loc="upper right")
        for row in range(3):
            axes[row, col].set_xticks(list(x))
            axes[row, col].set_xticklabels(layers, rotation=45, fontsize=7)
        axes[0, col].set_yscale("log")
        axes[1, col].set_yscale("log")
        axes[0, col].set_title(f"{recipe}: covariance shift ‖Σ′−Σ‖₂")
        axes[1, col].set_title(f"{recipe}: mean shift ‖µ′−µ‖₂")
        axes[2, col].set_title(f"{recipe}: ω = ‖Mⁱ‖² of the temporal module")
        if col == len(recipes) - 1:
            axes[0, col].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            axes[1, col].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            axes[0, col].legend(fontsize=6, loc="lower right")
            axes[1, col].legend(fontsize=6, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
