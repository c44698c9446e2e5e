"""Gradient analysis: where does each divergence push the student as tau grows?

The paper's mechanism: raising the distillation temperature tau enriches the forward-KL
gradient with the teacher's NON-DOMINANT tokens, while it mostly rescales the reverse-KL one.
We measure it directly. For student logits S and teacher logits T [N, V] and each
(objective, tau) we take G = d D_tau(S, T) / dS per position (autograd through
`distill.losses.divergences.divergence_per_token`, no tau^2), split every row into the teacher's top-k
tokens ("dominant"; top-k of p_tau is the same set at every tau because softmax is monotone)
and the rest, and report, as means over positions (norm_ratio: median):

  share          ||G_rest|| / ||G||        (norm share, in [0, 1])
  share_sq       ||G_rest||^2 / ||G||^2    (energy share; dominant + rest energies add to 1)
  teacher_tail   1 - sum_topk p_tau        (teacher mass outside its own top-k)
  student_tail   1 - sum_topk q_tau        (student mass outside the TEACHER's top-k)
  grad_norm      ||G||                     (raw gradient scale)
  grad_norm_tau2 tau^2 ||G||               (scale with Hinton's tau^2 factor, as trained
                                            with loss.tau_squared=true)
  cos_tau1       cos(G_tau, G_1)           (direction: 1 = tau only rescales the update)
  norm_ratio     ||G_tau|| / ||G_1||       (scale, median over positions; 1/tau^2 is what tau^2
                                            compensates exactly)
  norm_ratio_tau2 tau^2 ||G_tau|| / ||G_1|| (scale as trained with loss.tau_squared=true)

A share alone cannot tell "enriched" from "rescaled": a pure rescaling G_tau = c G_1 keeps every
share, but so can a new direction. So per position we also compare G_tau with the same position's
G at tau = 1 (computed whether or not 1 is among the taus): cos_tau1 = 1 means the same direction,
only the scale (norm_ratio) changed.

Positions whose gradient is numerically zero (tau ||G|| < 1e-6: float32 rounding of the
probabilities, e.g. a student equal to its teacher) have no direction; they are left out of
the share means (and counted in `n_zero`) but kept in every other mean. cos_tau1 and the norm
ratios leave out positions where G_tau or G_1 is numerically zero.

Reading it: the FKL/RKL contrast needs a student that differs from its teacher. Where q ~ p the
two gradients agree to first order (both ~ (q - p) / tau) and so do their shares; with a peaked
teacher and a flatter student, FKL's share climbs with tau while RKL's (which is ~0 wherever
q ~ 0) barely moves. Over a large vocabulary every share tends to 1 as tau grows, since both
distributions flatten towards uniform.

`run_analysis` is the Python entry point (models + batches, or precomputed logits);
`main` is the `distill-analyze` CLI, which writes grad_analysis.{csv,md,png} atomically.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distill.config import CONF_DIR
from distill.data.encoding import response_mask
from distill.losses.divergences import align_vocab, divergence_per_token
from distill.options import DIVERGENCES
from distill.files import atomic_write_bytes
from distill.report.tables import csv_table, markdown_table, number

DEFAULT_TAUS = (0.5, 1.0, 2.0, 4.0, 8.0)
COLUMNS = ("objective", "tau", "topk", "n_positions", "n_zero", "share", "cos_tau1", "norm_ratio",
           "norm_ratio_tau2", "share_sq", "teacher_tail", "student_tail", "grad_norm", "grad_norm_tau2")
REFERENCE_TAU = 1.0   # direction and scale are measured against the gradient at this tau
OUTPUT_NAMES = ("grad_analysis.csv", "grad_analysis.md", "grad_analysis.png")
# tau * G is on the scale of a probability difference (FKL: q - p); below this it is rounding noise.
ZERO_GRAD = 1e-6


# ----------------------------------------------------------------------------- validation

def parse_taus(taus: str | Iterable[float]) -> list[float]:
    """'0.5,1,2' or a sequence of numbers -> list of finite positive floats (order kept)."""
    items = taus.split(",") if isinstance(taus, str) else list(taus)
    out = []
    for item in items:
        try:
            tau = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"bad tau {item!r} in {taus!r}: taus must be positive numbers, e.g. 0.5,1,2,4,8") from None
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"bad tau {item!r} in {taus!r}: taus must be finite and > 0")
        out.append(tau)
    if not out:
        raise ValueError(f"no taus given ({taus!r}); e.g. 0.5,1,2,4,8")
    return out


def parse_objectives(objectives: str | Iterable[str]) -> list[str]:
    """'fkl,rkl' or a sequence of names -> list of known divergence names."""
    names = [n.strip() for n in (objectives.split(",") if isinstance(objectives, str) else objectives)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in DIVERGENCES]
    if unknown or not names:
        raise ValueError(f"unknown objective(s) {unknown or objectives!r}; allowed: {', '.join(DIVERGENCES)}")
    return names


def default_params(objective: str) -> dict[str, Any]:
    """The divergence's hyper-parameters from conf/divergence/<name>.yaml (same as training)."""
    path = CONF_DIR / "divergence" / f"{objective}.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf  # only needed here

    cfg = OmegaConf.to_container(OmegaConf.load(path))
    return {k: v for k, v in cfg.items() if k != "name"}


# ----------------------------------------------------------------------------- pure math

def teacher_topk_mask(teacher_logits: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Bool [N, V], True on each row's k largest teacher logits (= top-k of p_tau, any tau)."""
    vocab = teacher_logits.shape[-1]
    if not (isinstance(k, int) and 1 <= k < vocab):
        raise ValueError(f"topk must be an integer in [1, {vocab - 1}] (vocab {vocab}), got {k!r}")
    idx = teacher_logits.topk(k, dim=-1).indices
    return torch.zeros_like(teacher_logits, dtype=torch.bool).scatter_(-1, idx, True)


def gradient(objective: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             tau: float, **params: Any) -> torch.Tensor:
    """G = d D_tau(S, T) / dS, one row per position (no tau^2), by autograd through the loss core.

    Summing the per-position divergences before differentiating is exact: position n's value
    depends on row n of S only, so row n of the gradient is that position's own gradient.
    """
    s = student_logits.detach().float().requires_grad_(True)
    with torch.enable_grad():
        d = divergence_per_token(objective, s, teacher_logits.detach().float(), tau=tau, **params)
        (g,) = torch.autograd.grad(d.sum(), s)
    return g


def split_gradient(grad: torch.Tensor, dominant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split G into (G on dominant tokens, G on the rest); the two parts sum back to G."""
    return grad * dominant, grad * ~dominant


def tail_mass(logits: torch.Tensor, dominant: torch.Tensor, tau: float) -> torch.Tensor:
    """Per row, softmax(logits / tau) mass outside `dominant` (summed directly: no 1 - 0.9999 cancellation)."""
    probs = F.softmax(logits.float() / tau, dim=-1)
    return (probs * ~dominant).sum(-1)


def row_stats(grad: torch.Tensor, dominant: torch.Tensor, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-position norm, norm share and energy share of the non-dominant part of G.

    Rows with a numerically zero gradient (tau ||G|| < ZERO_GRAD) get NaN shares: no direction."""
    _, rest = split_gradient(grad, dominant)
    norm = grad.norm(dim=-1)
    rest_norm = rest.norm(dim=-1)
    nan = torch.full_like(norm, float("nan"))
    share = torch.where(tau * norm >= ZERO_GRAD, rest_norm / norm.clamp_min(1e-30), nan)
    return {"norm": norm, "share": share, "share_sq": share**2}


def direction_stats(grad: torch.Tensor, ref: torch.Tensor, tau: float) -> dict[str, torch.Tensor]:
    """Per position, the cosine between G_tau (`grad`) and G_1 (`ref`) and the ratio of their norms.

    NaN where either gradient is numerically zero (no direction to compare)."""
    norm, ref_norm = grad.norm(dim=-1), ref.norm(dim=-1)
    ok = (tau * norm >= ZERO_GRAD) & (REFERENCE_TAU * ref_norm >= ZERO_GRAD)
    nan = torch.full_like(norm, float("nan"))
    cos = torch.where(ok, F.cosine_similarity(grad, ref, dim=-1, eps=1e-30), nan)
    ratio = torch.where(ok, norm / ref_norm.clamp_min(1e-30), nan)
    return {"cos": cos, "ratio": ratio}


def analyze_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                   objectives: Sequence[str], taus: Sequence[float], topk: int = 1,
                   params: Mapping[str, Mapping[str, Any]] | None = None,
                   chunk_size: int = 256) -> list[dict[str, Any]]:
    """The analysis table for logits [N, V]: one row per (objective, tau), columns `COLUMNS`.

    `params` maps an objective to its hyper-parameters (default: conf/divergence/<name>.yaml).
    Positions are processed `chunk_size` at a time so a large vocabulary never needs a full
    [N, V] gradient in memory."""
    if student_logits.dim() != 2:
        raise ValueError(f"need logits of shape [N, V], got {tuple(student_logits.shape)}")
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits)  # the training vocab rule
    if student_logits.shape[0] == 0:
        raise ValueError("no positions to analyse (empty logits: are all labels -100?)")
    objectives, taus = parse_objectives(objectives), parse_taus(taus)
    params = {o: dict(params[o]) if params and o in params else default_params(o) for o in objectives}
    n = student_logits.shape[0]
    rows = []
    keys = ("norm", "share", "share_sq", "t_tail", "s_tail", "cos", "ratio")
    for objective in objectives:
        acc: dict[float, dict[str, list[torch.Tensor]]] = {tau: {k: [] for k in keys} for tau in taus}
        for start in range(0, n, chunk_size):
            s = student_logits[start:start + chunk_size].float()
            t = teacher_logits[start:start + chunk_size].float()
            dominant = teacher_topk_mask(t, topk)
            ref = gradient(objective, s, t, REFERENCE_TAU, **params[objective])
            for tau in taus:
                g = ref if tau == REFERENCE_TAU else gradient(objective, s, t, tau, **params[objective])
                for key, val in {**row_stats(g, dominant, tau), **direction_stats(g, ref, tau)}.items():
                    acc[tau][key].append(val)
                acc[tau]["t_tail"].append(tail_mass(t, dominant, tau))
                acc[tau]["s_tail"].append(tail_mass(s, dominant, tau))
        for tau in taus:
            cat = {k: torch.cat(v) for k, v in acc[tau].items()}
            grad_norm = cat["norm"].mean().item()
            # median, not mean: where G_1 is tiny (student ~ teacher at tau=1) single ratios explode
            ratio = cat["ratio"].nanmedian().item()
            rows.append({
                "objective": objective, "tau": tau, "topk": topk, "n_positions": n,
                "n_zero": int(cat["share"].isnan().sum()),
                "share": cat["share"].nanmean().item(), "cos_tau1": cat["cos"].nanmean().item(),
                "norm_ratio": ratio, "norm_ratio_tau2": tau**2 * ratio, "share_sq": cat["share_sq"].nanmean().item(),
                "teacher_tail": cat["t_tail"].mean().item(), "student_tail": cat["s_tail"].mean().item(),
                "grad_norm": grad_norm, "grad_norm_tau2": tau**2 * grad_norm,
            })
    return rows


# ----------------------------------------------------------------------------- models -> logits

@torch.no_grad()
def response_logits(teacher: torch.nn.Module, student: torch.nn.Module,
                    batches: Iterable[Mapping[str, torch.Tensor]],
                    max_positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits at response positions only -> (student [N, V], teacher [N, V]).

    Batches are dicts with `input_ids`, `labels` (HF convention: same length as input_ids,
    -100 where no loss; the logit at t predicts labels[t + 1]) and optionally `attention_mask`.
    A teacher with extra (padded) vocab columns keeps them here; `analyze_logits` drops them."""
    teacher.eval()
    student.eval()
    device = next(student.parameters()).device
    s_out, t_out, n = [], [], 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = mask.to(device) if mask is not None else torch.ones_like(ids)
        keep = response_mask(batch["labels"].to(device))
        s = student(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][keep]
        t = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][keep]
        s_out.append(s.float().cpu())
        t_out.append(t.float().cpu())
        n += s.shape[0]
        if max_positions is not None and n >= max_positions:
            break
    if not s_out:
        raise ValueError("no batches to analyse")
    s, t = torch.cat(s_out), torch.cat(t_out)
    return (s[:max_positions], t[:max_positions]) if max_positions is not None else (s, t)


# ----------------------------------------------------------------------------- outputs

def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table as CSV text (full float precision)."""
    return csv_table(COLUMNS, ([r[k] for k in COLUMNS] for r in rows))


def table_markdown(rows: Sequence[Mapping[str, Any]], title: str = "Gradient analysis") -> str:
    """The table as a Markdown document (floats to 4 significant digits) with a legend of the columns."""
    table = "\n".join(markdown_table(COLUMNS, ([number(r[k], ".4g") for k in COLUMNS] for r in rows))) + "\n"
    legend = (
        "\nMeans over response positions. G = dD_tau/dS (student logits), no tau^2.\n"
        "share = ||G_rest||/||G||, share_sq = ||G_rest||^2/||G||^2 (rest = outside the teacher's top-k; "
        "positions with a numerically zero G are left out of the shares and counted in n_zero);\n"
        "cos_tau1 = cos(G_tau, G_1) per position (direction: 1 = tau only rescales the update), "
        "norm_ratio = median over positions of ||G_tau|| / ||G_1|| (scale; 1/tau^2 = exactly what the tau^2 factor undoes), "
        "norm_ratio_tau2 = tau^2 norm_ratio;\n"
        "teacher_tail / student_tail = mass of p_tau / q_tau outside the teacher's top-k; "
        "grad_norm = ||G||, grad_norm_tau2 = tau^2 ||G||.\n"
    )
    return f"# {title}\n\n{table}{legend}"


def plot_png(rows: Sequence[Mapping[str, Any]], title: str = "") -> bytes:
    """Four panels vs tau (log2 axis): per objective the non-dominant gradient share, its direction
    (cosine to the gradient at tau=1) and its scale (norm ratio to tau=1, log2 axis, with the 1/tau^2
    line the tau^2 factor undoes exactly); and the teacher's and student's tail masses."""
    import matplotlib

    matplotlib.use("Agg")  # headless; no display needed
    import matplotlib.pyplot as plt

    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    taus = sorted({r["tau"] for r in rows})
    topk = rows[0]["topk"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), constrained_layout=True)
    (ax_share, ax_tail), (ax_cos, ax_ratio) = axes
    markers = "osD^vP*Xh"
    for i, obj in enumerate(objectives):
        mine = sorted((r for r in rows if r["objective"] == obj), key=lambda r: r["tau"])
        x = [r["tau"] for r in mine]
        style = {"marker": markers[i % len(markers)], "label": obj}
        ax_share.plot(x, [r["share"] for r in mine], **style)
        ax_cos.plot(x, [r["cos_tau1"] for r in mine], **style)
        ax_ratio.plot(x, [r["norm_ratio"] for r in mine], **style)
    ax_share.set_ylabel(r"non-dominant share  $\|G_{rest}\| / \|G\|$")
    ax_share.set_title(f"Gradient share outside the teacher's top-{topk}")
    ax_share.legend(title="objective", ncol=2, fontsize=9)
    ax_cos.set_ylabel(r"$\cos(G_\tau, G_1)$, mean over positions")
    ax_cos.set_title(r"Direction: 1 = $\tau$ only rescales the update")
    ax_ratio.plot(taus, [t**-2 for t in taus], color="black", linestyle=":", label=r"$1/\tau^2$ ($\tau^2$ undoes it)")
    ax_ratio.set_yscale("log", base=2)
    ax_ratio.set_ylabel(r"$\|G_\tau\| / \|G_1\|$, median over positions")
    ax_ratio.set_title(r"Scale relative to $\tau = 1$ (no $\tau^2$)")
    ax_ratio.legend(fontsize=8, ncol=2)
    first = [r for r in rows if r["objective"] == objectives[0]]
    pts = sorted((r["tau"], r["teacher_tail"], r["student_tail"]) for r in first)
    x, t_tail, s_tail = zip(*pts)
    ax_tail.plot(x, t_tail, marker="o", color="black", label=r"teacher  $1-\sum_{top\text{-}k} p_\tau$")
    ax_tail.plot(x, s_tail, marker="s", color="gray", linestyle="--", label=r"student  $1-\sum_{top\text{-}k} q_\tau$")
    ax_tail.set_ylabel("probability mass outside the teacher's top-k")
    ax_tail.set_title("Tail mass")
    ax_tail.legend(fontsize=9)
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(taus, [f"{t:g}" for t in taus])
        ax.set_xlabel(r"distillation temperature $\tau$ (log$_2$ scale)")
        ax.grid(alpha=0.3)
    for ax in (ax_share, ax_tail):
        ax.set_ylim(-0.02, 1.02)
    lowest_cos = min((r["cos_tau1"] for r in rows if math.isfinite(r["cos_tau1"])), default=0.0)
    ax_cos.set_ylim(min(-0.02, lowest_cos - 0.02), 1.02)
    n = rows[0]["n_positions"]
    fig.suptitle(title or f"Where the gradient goes as tau grows ({n} response positions)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write grad_analysis.{csv,md,png} into `out_dir` (created if needed), each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in OUTPUT_NAMES]
    atomic_write_bytes(paths[0], table_csv(rows).encode())
    atomic_write_bytes(paths[1], table_markdown(rows, title or "Gradient analysis").encode())
    atomic_write_bytes(paths[2], plot_png(rows, title))
    return paths


def log_wandb(rows: Sequence[Mapping[str, Any]], png: Path, out_dir: Path, project: str = "distill") -> None:
    """Log the table and the figure to an OFFLINE W&B run under out_dir (sync later with `wandb sync`)."""
    import wandb

    run = wandb.init(project=project, job_type="analyze", dir=str(out_dir), mode="offline",
                     reinit="finish_previous", settings=wandb.Settings(console="off", silent=True),
                     config={"objectives": sorted({r["objective"] for r in rows}),
                             "taus": sorted({r["tau"] for r in rows}), "topk": rows[0]["topk"]})
    try:
        run.log({"grad_analysis": wandb.Table(columns=list(COLUMNS), data=[[r[k] for k in COLUMNS] for r in rows]),
                 "grad_analysis_plot": wandb.Image(str(png))})
    finally:
        run.finish()


# ----------------------------------------------------------------------------- entry points

def run_analysis(teacher: torch.nn.Module | None, student: torch.nn.Module | None,
                 batches_or_logits: Iterable[Mapping[str, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor], *,
                 objectives: Sequence[str] = tuple(DIVERGENCES), taus: Sequence[float] = DEFAULT_TAUS,
                 topk: int = 1, out_dir: str | Path | None = None,
                 params: Mapping[str, Mapping[str, Any]] | None = None,
                 max_positions: int | None = None, wandb: bool = False, title: str = "") -> list[dict[str, Any]]:
    """Analyse a teacher/student pair and return the table (one dict per (objective, tau)).

    `batches_or_logits` is either an iterable of batches (needs `teacher` and `student`; see
    `response_logits`) or a precomputed `(student_logits, teacher_logits)` pair [N, V] (models
    may then be None). With `out_dir`, writes grad_analysis.{csv,md,png} there, and with
    `wandb=True` also logs them to an offline W&B run."""
    objectives, taus = parse_objectives(objectives), parse_taus(taus)  # fail before running models
    if isinstance(batches_or_logits, tuple) and len(batches_or_logits) == 2 and all(
            isinstance(x, torch.Tensor) for x in batches_or_logits):
        s, t = batches_or_logits
        if max_positions is not None:
            s, t = s[:max_positions], t[:max_positions]
    else:
        if teacher is None or student is None:
            raise ValueError("batches need both a teacher and a student model (or pass (student_logits, teacher_logits))")
        s, t = response_logits(teacher, student, batches_or_logits, max_positions)
    rows = analyze_logits(s, t, objectives=objectives, taus=taus, topk=topk, params=params)
    if out_dir is not None:
        paths = write_outputs(rows, out_dir, title)
        if wandb:
            log_wandb(rows, paths[2], Path(out_dir))
    return rows
