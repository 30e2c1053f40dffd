"""``hcral figures``: the paper's Fig. 3 and the analysis plots, as PNG (matplotlib, Agg backend).

- ``fig3b_omega.png``: ω (CF_cls) against IoU for several μ, at p* = 0 and p* = 1 (§3);
- ``fig3c_t.png``: t (CF_reg) against IoU for several γ (§4);
- ``fig3a_score_iou.png``: score against IoU of the positives of a trained baseline and a trained
  HCRAL model on validation images, with the line ``score = IoU + α`` and its two regions (§2);
- ``fig_priors_weights.png``: on one validation image, the priors with the largest RCI and CF
  weights of HCRA-C and HCRA-R, and the positives EATSS adds to ATSS (§5, Fig. 1's anchors C, D);
- ``fig_loss_curves.png``: each logged loss term against the iteration, baseline and HCRAL.
- ``ap_vs_iteration.png`` (``--ap-curves RUN...``): validation AP against the iteration;
- ``grad_share.png`` (``--grad-share RUN...``): how the classification gradient splits between
  positives and negatives and between RCI's regions, from runs trained with ``train.log_grad_share``.

Every weight comes from :func:`hcral.losses.cls_weights` and :func:`hcral.losses.reg_weights`
(no formula is re-derived here); per-prior data come from the head's public pieces (its forward
outputs, ``prior_layout``, ``decode``, ``assign``), the same steps as ``DenseHead.loss``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["grad_share_curves", "make_figures", "omega_curve", "prior_data", "t_curve"]

# Curves of Fig. 3(b) and 3(c): the values of μ and γ drawn, and the IoU resolution.
OMEGA_MUS = (0.0, 0.25, 0.5, 0.75, 1.0)
T_GAMMAS = (0.0, 0.5, 1.0, 2.0)
CURVE_POINTS = 201
# Side of the target box used to realise a given IoU with concentric boxes (any size works).
_BOX_SIDE = 100.0
# Fig. 3(a): validation images scanned for positives.
SCORE_IOU_IMAGES = 64
# Per-prior figure: how many of the largest weights are marked in each panel.
TOP_PRIORS = 25
DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# Fig. 3(b), 3(c): pure functions of the losses' weights
# ---------------------------------------------------------------------------------------------


def omega_curve(*, mu: float, positive: bool, points: int = CURVE_POINTS) -> tuple[list[float], list[float]]:
    """(u, ω) over u in [0, 1] from :func:`hcral.losses.cls_weights` with RCI off (§3)."""
    from hcral.losses import cls_weights

    u = torch.linspace(0, 1, points, dtype=torch.float64)[:, None]  # (N, 1): one class
    targets = torch.full_like(u, 1.0 if positive else 0.0)
    logits = torch.zeros_like(u)  # ω does not depend on the score
    _, omega, _ = cls_weights(logits, targets, u, mu=mu, use_rci=False, use_cf=True)
    return u[:, 0].tolist(), omega[:, 0].tolist()


def t_curve(*, gamma: float, points: int = CURVE_POINTS) -> tuple[list[float], list[float]]:
    """(q, t) over IoU q in [0, 1] from :func:`hcral.losses.reg_weights` with RCI off (§4).

    The predicted box is concentric with the target (DIoU penalty R = 0) and of side ``sqrt(q)``
    times the target's, so its IoU is exactly q.
    """
    from hcral.losses import reg_weights

    q = torch.linspace(0, 1, points, dtype=torch.float64)
    half = _BOX_SIDE / 2 * q.sqrt()
    target = torch.tensor([-_BOX_SIDE / 2, -_BOX_SIDE / 2, _BOX_SIDE / 2, _BOX_SIDE / 2], dtype=torch.float64)
    pred = torch.stack((-half, -half, half, half), dim=-1)
    _, t = reg_weights(pred, target.expand_as(pred), torch.zeros_like(q), gamma=gamma, use_rci=False, use_cf=True)
    return q.tolist(), t.tolist()


def fig_omega(path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, positive in zip(axes, (False, True)):
        for mu in OMEGA_MUS:
            u, omega = omega_curve(mu=mu, positive=positive)
            ax.plot(u, omega, label=f"μ = {mu:g}")
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_title(f"ω = 1 {'+' if positive else '−'} u(u − μ)²   (p* = {int(positive)})")
        ax.set_xlabel("IoU u")
    axes[0].set_ylabel("ω (CF of HCRA-C)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Fig. 3(b): the conditioning factor ω of HCRA-C (formulation §3)")
    return _save(fig, path)


def fig_t(path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for gamma in T_GAMMAS:
        q, t = t_curve(gamma=gamma)
        ax.plot(q, t, label=f"γ = {gamma:g}")
    ax.set_xlabel("IoU q (concentric boxes, R = 0)")
    ax.set_ylabel("t = (1 − q + R)^γ")
    ax.set_title("Fig. 3(c): the conditioning factor t of HCRA-R (§4)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Per-prior data of a trained model
# ---------------------------------------------------------------------------------------------


def load_run(run_dir: str | Path, *, device: str = "cpu"):
    """(config, model in eval mode, validation dataset) of a run folder (config.yaml + checkpoint.pt)."""
    from hcral.config import load_config
    from hcral.models.build import build_model
    from hcral.runner import CHECKPOINT, build_dataset, load_checkpoint, load_model_weights

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", [f"train.device={device}"])
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    dataset = build_dataset(cfg, train=False, class_names=ckpt.get("class_names"))
    model = build_model(cfg, dataset.num_classes)
    load_model_weights(model, run_dir / CHECKPOINT, ckpt)
    return cfg, model.eval(), dataset


@torch.no_grad()
def _head_outputs(model, dataset, indices: list[int]):
    """The head's forward outputs on some validation images: what ``DenseHead.loss`` starts from."""
    from hcral.data import collate
    from hcral.runner import SIZE_DIVISOR

    images, targets = collate([dataset[i] for i in indices], size_divisor=SIZE_DIVISOR)
    head = model.head
    feats = model.neck(model.backbone(images))
    cls_logits, reg, _, sizes = head(feats)
    layout = head.prior_layout(sizes, cls_logits.device)
    boxes = head.decode(layout, reg.float())  # (B, N, 4)
    return head, layout, cls_logits.float(), boxes, targets


@torch.no_grad()
def positives_score_iou(
    run_dir: str | Path, *, num_images: int = SCORE_IOU_IMAGES, batch: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU of the predicted box with its GT, score at the GT's class) of every ATSS positive.

    ATSS (not the run's own assigner) picks the positives for every model, so a baseline and an
    HCRAL model are compared on the same kind of samples.
    """
    from hcral.assign import atss_assign
    from hcral.ops.boxes import aligned_iou

    cfg, model, dataset = load_run(run_dir)
    ious, scores = [], []
    n = min(num_images, len(dataset))
    for start in range(0, n, batch):
        head, layout, logits, boxes, targets = _head_outputs(model, dataset, list(range(start, min(start + batch, n))))
        for i, t in enumerate(targets):
            a = atss_assign(layout.assign_boxes, layout.num_level_priors, t["boxes"], t["labels"], topk=cfg.loss.atss_topk)
            pos = a.pos_mask.nonzero(as_tuple=True)[0]
            if pos.numel() == 0:
                continue
            ious.append(aligned_iou(boxes[i, pos], t["boxes"][a.gt_index[pos]]).clamp(min=0))
            scores.append(logits[i, pos, a.labels[pos]].sigmoid())
    if not ious:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(ious), torch.cat(scores)


@torch.no_grad()
def prior_data(run_dir: str | Path, *, image_index: int = 0) -> dict[str, Any]:
    """Per-prior weights of one validation image under the run's HCRAL settings (§1-§5).

    Follows ``DenseHead.loss``: detached predicted boxes and scores -> the head's assignment
    (EATSS if the run uses it) -> u (§1) -> ``cls_weights`` and, for positives, ``reg_weights``.
    For every prior, w and ω are taken at the prior's own class if positive and otherwise at its
    highest-scoring class (the class it would be detected as).
    """
    from hcral.assign import atss_assign
    from hcral.losses import cls_weights, hcra_ious, reg_weights
    from hcral.ops.boxes import box_centers

    cfg, model, dataset = load_run(run_dir)
    head, layout, logits, boxes, targets = _head_outputs(model, dataset, [image_index])
    t, logit, box = targets[0], logits[0], boxes[0]  # (N, C), (N, 4)
    scores = logit.sigmoid()
    a = head.assign(layout, t, box, scores)
    pos = a.pos_mask
    u = hcra_ious(box, t["boxes"], t["labels"], a.gt_index, head.num_classes)  # (N, C), §1
    pos_idx = pos.nonzero(as_tuple=True)[0]
    onehot = torch.zeros_like(logit)
    onehot[pos_idx, a.labels[pos_idx]] = 1.0
    c = cfg.loss
    _, omega, w = cls_weights(logit, onehot, u, alpha=c.hcra_alpha, theta=c.hcra_theta, mu=c.hcra_mu, bins=c.ghm_bins)
    cls_of = torch.where(pos, a.labels.clamp(min=0), scores.argmax(-1))  # (N,)
    rows = torch.arange(len(cls_of))
    pos_score = scores[pos_idx, a.labels[pos_idx]]
    rho, tt = reg_weights(
        box[pos_idx], t["boxes"][a.gt_index[pos_idx]], pos_score, alpha=c.hcra_alpha, ep=c.hcra_ep, gamma=head.hcra_gamma,
    )  # fmt: skip
    atss = atss_assign(layout.assign_boxes, layout.num_level_priors, t["boxes"], t["labels"], topk=c.atss_topk)
    scale = float(t["scale_factor"])
    return {
        "image": dataset.load_image(image_index).permute(1, 2, 0),  # (H, W, 3) for imshow
        "scale": scale,
        "centers": box_centers(layout.assign_boxes) / scale,  # (N, 2) original pixels
        "pred_boxes": box / scale,
        "gt_boxes": t["boxes"] / scale,
        "gt_labels": t["labels"],
        "class_names": list(dataset.class_names),
        "pos": pos,
        "atss_pos": atss.pos_mask,
        "expanded": a.expanded,
        "score": scores[rows, cls_of],
        "u": u[rows, cls_of],
        "w": w[rows, cls_of],
        "omega": omega[rows, cls_of],
        "rho": rho,
        "t": tt,
        "pos_index": pos_idx,
        "alpha": c.hcra_alpha,
        "assigner": c.assigner,
        "gamma": head.hcra_gamma,
    }


# ---------------------------------------------------------------------------------------------
# Figures of trained models
# ---------------------------------------------------------------------------------------------


def fig_score_iou(
    path: Path,
    panels: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float,
    samples: str = "ATSS positives",
    ylabel: str = "classification score p",
    title: str = "Fig. 3(a): score vs IoU of the positives (validation images)",
) -> Path:
    """Fig. 3(a): one scatter panel per ``panels`` entry ``name: (iou (K,), score (K,))`` with the
    line ``score = IoU + α`` and the share of points in each of its regions (§2)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), sharey=True, squeeze=False)
    line = [0.0, 1.0]
    for ax, (name, (iou, score)) in zip(axes[0], panels.items()):
        above = (score - iou - alpha > 0).float()
        ax.fill_between(line, [v + alpha for v in line], [1.0, 1.0], color="tab:red", alpha=0.08)
        ax.fill_between(line, [0.0, 0.0], [v + alpha for v in line], color="tab:blue", alpha=0.08)
        ax.scatter(iou.tolist(), score.tolist(), s=4, alpha=0.5, color="k")
        ax.plot(line, [v + alpha for v in line], color="tab:red", lw=1.2, label=f"score = IoU + α (α = {alpha:g})")
        frac = above.mean().item() if above.numel() else math.nan
        ax.text(0.03, 0.93, f"region 1 (above): {frac:.0%}", color="tab:red", transform=ax.transAxes, fontsize=8)
        ax.text(0.55, 0.05, f"region 2 (below): {1 - frac:.0%}", color="tab:blue", transform=ax.transAxes, fontsize=8)
        mean_iou = iou.mean().item() if iou.numel() else math.nan
        mean_score = score.mean().item() if score.numel() else math.nan
        corr = torch.corrcoef(torch.stack((iou, score)))[0, 1].item() if iou.numel() > 1 else math.nan
        ax.set_title(
            f"{name}\n{iou.numel()} {samples}: mean IoU {mean_iou:.2f}, mean score {mean_score:.2f}, "
            f"Pearson r {corr:.2f}",
            fontsize=8,
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("IoU(predicted box, GT)")
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.9))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def fig_priors(path: Path, run: Path, *, image_index: int = 0, top: int = TOP_PRIORS) -> Path:
    plt = _plt()
    d = prior_data(run, image_index=image_index)
    panels = [
        ("HCRA-C RCI weight w (top {k}, size ∝ w)", d["w"], None),
        ("HCRA-C CF weight ω (top {k} |ω − 1|)", (d["omega"] - 1).abs(), d["omega"]),
        ("HCRA-R weight ρ·t over positives", None, None),
        (f"{d['assigner'].upper()} positives: ATSS (o) and added (★)", None, None),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.8))
    for ax, (title, key, shown) in zip(axes, panels):
        ax.imshow(d["image"])
        for (x1, y1, x2, y2), label in zip(d["gt_boxes"].tolist(), d["gt_labels"].tolist()):
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1.2))
        ax.set_xticks([])
        ax.set_yticks([])
        cx, cy = d["centers"][:, 0], d["centers"][:, 1]
        if key is not None:
            k = min(top, key.numel())
            idx = key.topk(k).indices
            values = (shown if shown is not None else key)[idx]
            pos = d["pos"][idx]
            size = 20 + 60 * key[idx] / key[idx].max().clamp(min=1e-9)
            sc = ax.scatter(
                cx[idx].tolist(), cy[idx].tolist(), c=values.tolist(), cmap="coolwarm", s=size.tolist(),
                edgecolors=["k" if p else "none" for p in pos.tolist()], linewidths=0.8,
            )  # fmt: skip
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(title.format(k=k) + "\n(black edge: positive; others: negatives at their top class)", fontsize=8)
        elif "ρ" in title:
            pi = d["pos_index"]
            weight = d["rho"] * d["t"]
            if pi.numel():
                sc = ax.scatter(
                    cx[pi].tolist(), cy[pi].tolist(), c=weight.tolist(), cmap="viridis", s=30, edgecolors="k", linewidths=0.4
                )
                fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(f"{title}\n(ρ > 1: score ahead of IoU; γ = {d['gamma']:g})", fontsize=8)
        else:
            atss = d["atss_pos"]
            ext = d["expanded"]
            ax.scatter(cx[atss].tolist(), cy[atss].tolist(), s=18, facecolors="none", edgecolors="yellow", linewidths=1.0)
            if ext.any():
                ax.scatter(cx[ext].tolist(), cy[ext].tolist(), s=90, marker="*", color="red")
                for x1, y1, x2, y2 in d["pred_boxes"][ext].tolist():
                    ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red", lw=0.8, ls="--"))
            ax.set_title(
                f"{title}\n{int(atss.sum())} ATSS positives, {int(ext.sum())} added (dashed: their predicted boxes)",
                fontsize=8,
            )
    fig.suptitle(
        f"Per-prior weights of a trained HCRAL model on validation image {image_index} (GT boxes in green)", fontsize=10
    )
    return _save(fig, path)


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no training log: {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fig_loss_curves(path: Path, runs: dict[str, Path]) -> Path:
    plt = _plt()
    logs = {name: [r for r in read_log(run) if "loss" in r] for name, run in runs.items()}
    names = {k for rs in logs.values() for r in rs for k in r if k.startswith("loss")}
    terms = sorted(names, key=lambda k: (k == "loss", k))  # the total last
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.4), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for name, rs in logs.items():
            pts = [(r["iter"], r[term]) for r in rs if term in r]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1)
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("iteration")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        "Training loss terms (weighted as in the config; HCRA-C is normalised by all elements, focal by positives)",
        fontsize=9,
    )
    return _save(fig, path)


def fig_ap_curves(path: Path, runs: dict[str, Path]) -> Path:
    """Validation AP and AP50 against training iteration, from the runs' logs (``train.eval_interval``)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for name, run in runs.items():
        evals = [r for r in read_log(run) if "val_AP" in r]
        if not evals:
            raise ValueError(f"{run}/log.jsonl has no evaluation: train with train.eval_interval > 0")
        for ax, key in zip(axes, ("val_AP", "val_AP50")):
            ax.plot([r["iter"] for r in evals], [100 * r[key] for r in evals], marker=".", label=name, lw=1)
    for ax, key in zip(axes, ("AP", "AP50")):
        ax.set_title(f"validation {key} (x100)", fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def grad_share_curves(run_dir: str | Path) -> dict[str, list[float]]:
    """Per logged record of a run trained with ``train.log_grad_share=true``: the iteration, the
    negatives' share of the classification gradient's mass, region 1's share within positives and
    within negatives, and the mean |∂L/∂x| of a positive element over that of a negative one
    (hcral/models/heads/grad_share.py; NaN where a group is empty)."""
    rows = [r for r in read_log(run_dir) if "grad_pos" in r]
    if not rows:
        raise ValueError(f"{run_dir}/log.jsonl has no gradient share: train with train.log_grad_share=true")
    return {
        "iter": [r["iter"] for r in rows],
        "neg_share": [_ratio(r["grad_neg"], r["grad_pos"] + r["grad_neg"]) for r in rows],
        "pos_r1_share": [_ratio(r["grad_pos_r1"], r["grad_pos"]) for r in rows],
        "neg_r1_share": [_ratio(r["grad_neg_r1"], r["grad_neg"]) for r in rows],
        "pos_neg_mean_ratio": [
            _ratio(_ratio(r["grad_pos"], r["grad_n_pos"]), _ratio(r["grad_neg"], r["grad_n_neg"])) for r in rows
        ],
    }


def fig_grad_share(path: Path, runs: dict[str, Path]) -> Path:
    """The gradient share of each run against the iteration (:func:`grad_share_curves`)."""
    plt = _plt()
    panels = {
        "neg_share": "negatives' share of the mass",
        "pos_r1_share": "region 1's share within positives",
        "neg_r1_share": "region 1's share within negatives",
        "pos_neg_mean_ratio": "mean |∂L/∂x|: positive / negative element",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for name, run in runs.items():
        curves = grad_share_curves(run)
        for ax, key in zip(axes, panels):
            ax.plot(curves["iter"], curves[key], label=name, lw=1)
    for ax, (key, title) in zip(axes, panels.items()):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if key == "pos_neg_mean_ratio":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "Classification gradient mass Σ|∂L/∂x| per group, summed over each log interval "
        "(region 1: p − u − α > 0, formulation §2)",
        fontsize=9,
    )
    return _save(fig, path)


def run_labels(runs: list[str | Path]) -> dict[str, Path]:
    """``{label: run}`` with the shortest path suffix that tells the runs apart: ``focal/seed0``
    and ``ghmc/seed0`` for an ablation's run folders, the folder name alone when that is enough."""
    paths = [Path(run) for run in runs]
    for depth in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return dict(zip(labels, paths))
    raise ValueError(f"the same run folder is given twice: {[str(p) for p in paths]}")


def make_figures(
    out: str | Path = "docs/img",
    *,
    baseline_run: str | Path | None = None,
    hcral_run: str | Path | None = None,
    image_index: int = 0,
    only_curves: bool = False,
    ap_curves: list[str | Path] | None = None,
    grad_share: list[str | Path] | None = None,
) -> list[Path]:
    """Write the figures into ``out``; the ones needing trained runs only if both run folders are
    given. With ``ap_curves`` and/or ``grad_share`` (run folders), only the AP-versus-iteration
    and/or the gradient-share plot of those runs."""
    out = Path(out)
    if ap_curves or grad_share:
        paths = []
        if ap_curves:
            paths.append(fig_ap_curves(out / "ap_vs_iteration.png", run_labels(ap_curves)))
        if grad_share:
            paths.append(fig_grad_share(out / "grad_share.png", run_labels(grad_share)))
        return paths
    paths = [fig_omega(out / "fig3b_omega.png"), fig_t(out / "fig3c_t.png")]
    if only_curves:
        return paths
    if baseline_run is None or hcral_run is None:
        raise ValueError("figures of trained models need --baseline RUN_DIR and --hcral RUN_DIR (or --only-curves)")
    runs = {"baseline (FL + GIoU + ATSS)": Path(baseline_run), "HCRAL (HCRA-C + HCRA-R + EATSS)": Path(hcral_run)}
    for run in runs.values():
        if not (run / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"no checkpoint in run folder {run}")
    from hcral.config import load_config

    alpha = load_config(Path(hcral_run) / "config.yaml").loss.hcra_alpha
    points = {name: positives_score_iou(run) for name, run in runs.items()}
    paths.append(fig_score_iou(out / "fig3a_score_iou.png", points, alpha=alpha))
    paths.append(fig_priors(out / "fig_priors_weights.png", Path(hcral_run), image_index=image_index))
    paths.append(fig_loss_curves(out / "fig_loss_curves.png", runs))
    return paths
