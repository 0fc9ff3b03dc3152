"""A run of DINOv2's or DINOv3's linear protocol (:mod:`dinokit.eval.linear_grid`) inside the run
skeleton: the grid trained on augmented images (one backbone forward per step feeds every head) or on
features computed once (``--augment none``), a checkpoint after every epoch of ``epoch_length``
iterations, the heads validated and the best one chosen as the official code does."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import prepare_backbone
from ..data.images import ImageDataset, collate_skip_none, readable_batches
from ..errors import CheckpointError, DataError, DinokitError
from ..io import append_jsonl
from ..models.inference import inference_model
from ..models.vit import variant_generation
from ..progress import NULL_PROGRESS, Progress
from ..run import TrainingRun
from ..runtime import (
    autocast,
    dist_env,
    ensure_finite_loss,
    get_rng_state,
    is_dist,
    resolve_device,
    seed_everything,
    set_rng_state,
)
from .features import Embedder, align_labels, load_features, rank_shard_loader, scan_images
from .linear_grid import (
    EPOCH_LENGTH,
    LEARNING_RATES,
    HeadSpec,
    LinearGrid,
    batch_indices,
    choose_head,
    grid_counts,
    grid_optimizer,
    protocol_heads,
    token_vector,
)
from .metrics import percent, require_finite

log = logging.getLogger("dinokit")
GRID_FORMAT = "dinokit-linear-grid-1"


def grid_specs(cfg, protocol: str, depth: int | None) -> list[HeadSpec]:
    """The heads this run trains: the protocol's grid, narrowed by ``--lr`` (one learning rate),
    ``--n-last-blocks`` and ``--avgpool-patch-tokens`` where given; blocks beyond a shallow model's
    depth become its depth."""
    specs = protocol_heads(
        protocol,
        lrs=(cfg.lr,) if cfg.lr is not None else LEARNING_RATES,
        blocks=(cfg.n_last_blocks,) if cfg.n_last_blocks is not None else None,
        avgpool=(cfg.avgpool_patch_tokens,) if cfg.avgpool_patch_tokens is not None else None,
    )
    if depth is not None:
        specs = [HeadSpec(s.lr, min(s.n_blocks, depth), s.avgpool) for s in specs]
    return list(dict.fromkeys(specs))  # a shallow model's 1 and "4" blocks may be the same head


@dataclass
class GridData:
    """What the grid trains on: token vectors (cached) or image loaders, with their sizes."""

    k: int
    dim: int
    classes: list[str]
    n_train: int
    n_val: int
    fingerprint: dict[str, Any]
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    images: Any = None  #: (train dataset, val loader, model, dtype) for the image path
    extra: dict[str, Any] = field(default_factory=dict)


def _deinterleave(x: torch.Tensor, fp: dict) -> torch.Tensor:
    """DINO's reference order [CLS_0, avg_0, CLS_1, avg_1, ...] (n=1 with the mean, v1 weights) as
    [CLS, avg], the layout every head slices."""
    if (
        fp.get("n_last_blocks") == 1
        and fp.get("avgpool_patch_tokens")
        and variant_generation(fp.get("arch") or "") == 1
    ):
        return x.view(x.shape[0], -1, 2).permute(0, 2, 1).reshape(x.shape[0], -1)
    return x


def cached_grid_data(
    cfg, specs: list[HeadSpec], backbone, feature_spec, progress: Progress
) -> tuple[GridData, list[HeadSpec]]:
    """Every image's token vector computed once (or read from --train-features / --val-features)."""
    if (cfg.train_features is None) != (cfg.val_features is None):
        raise DataError("Give both --train-features and --val-features, or neither.")
    if cfg.train_features is not None:
        train, val = load_features(cfg.train_features), load_features(cfg.val_features)
        fp = train.fingerprint
        k, has_avg = int(fp.get("n_last_blocks", 1)), bool(fp.get("avgpool_patch_tokens", False))
        dim = int(fp.get("embed_dim") or train.dim // (k + has_avg))
        specs = [s for s in specs if s.n_blocks <= k and (has_avg or not s.avgpool)]
        if not specs:
            raise DataError(f"{cfg.train_features} holds {k} CLS token(s){' and the patch mean' if has_avg else ''}: "
                            "none of the protocol's heads reads from them; embed with dinokit features "
                            "--n-last-blocks 4 --avgpool-patch-tokens.")  # fmt: skip
    else:
        if cfg.train is None or cfg.val is None:
            raise DataError("Give --train and --val image folders (or --train-features and --val-features).")
        k = max(s.n_blocks for s in specs)
        model = backbone.model
        emb = Embedder(feature_spec(cfg, k, True), model=model)
        train_images = scan_images(cfg.train, labelled=True)
        val_images = scan_images(cfg.val, classes=train_images.classes, labelled=True)
        out = Path(cfg.output)
        train = emb.embed(
            train_images, cache=out / "train_features.pt", progress=progress, description="train features"
        )
        val = emb.embed(
            val_images, cache=out / "val_features.pt", progress=progress, description="val features"
        )
        dim, fp = int(model.embed_dim), train.fingerprint
    require_finite(train.features, "The training features")
    require_finite(val.features, "The validation features")
    val_y = align_labels(train, val, "training", "validation")
    data = GridData(k, dim, list(train.classes), len(train), len(val), dict(fp),
                    train_x=_deinterleave(train.features.float(), fp), train_y=train.labels,
                    val_x=_deinterleave(val.features.float(), fp), val_y=val_y)  # fmt: skip
    return data, specs


def image_grid_data(cfg, specs: list[HeadSpec], backbone, feature_spec, train_transform) -> GridData:
    """The image path: the training images through the official augmentation, the val loader."""
    if cfg.train is None or cfg.val is None:
        raise DataError("Give --train and --val image folders for the probe on images.")
    train_images = scan_images(cfg.train, labelled=True)
    val_images = scan_images(cfg.val, classes=train_images.classes, labelled=True)
    model = backbone.model
    for p in model.parameters():
        p.requires_grad_(False)
    k = max(s.n_blocks for s in specs)
    emb = Embedder(feature_spec(cfg, k, True), model=model)
    train_set = ImageDataset(train_images.paths, train_images.labels, train_transform(emb.normalization),
                             strict=cfg.strict, exact_decode=cfg.exact_decode)  # fmt: skip
    val_set = ImageDataset(val_images.paths, val_images.labels, emb.transform, strict=cfg.strict,
                           exact_decode=cfg.exact_decode)  # fmt: skip
    val_loader, _ = rank_shard_loader(val_set, cfg.batch_size, cfg.num_workers, backbone.device)
    run_model, run_dtype = inference_model(model, backbone.dtype)
    fp = dict(emb.fingerprint)
    return GridData(k, int(model.embed_dim), list(train_images.classes), len(train_set), len(val_set), fp,
                    images=(train_set, val_loader, run_model, run_dtype, backbone.device))  # fmt: skip


class GridRun:
    """The grid's optimiser, per-iteration cosine, checkpoints and validation inside ``run``."""

    def __init__(self, cfg, run: TrainingRun, data: GridData, specs: list[HeadSpec], epochs: int,
                 epoch_length: int, identity: dict, device):  # fmt: skip
        self.cfg, self.run, self.data, self.identity, self.device = cfg, run, data, identity, device
        self.epochs, self.epoch_length = epochs, epoch_length
        self.total = epochs * epoch_length
        self.scale = cfg.batch_size / 256.0
        seed_everything(cfg.seed)
        self.grid = LinearGrid(specs, data.k, data.dim, len(data.classes)).to(device)
        self.optimizer = grid_optimizer(self.grid, self.scale, cfg.momentum, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, self.total, eta_min=0)
        self.start_epoch, self.signum = 0, 0
        self.history: list[dict] = []
        self.scores: list[dict[str, float]] | None = None

    def maybe_resume(self, progress: Progress) -> None:
        self.run.check_identity(self.identity)
        ck = self.run.checkpoint
        if ck is None:
            return
        if ck.get("format") != GRID_FORMAT or int(ck.get("iterations", -1)) != self.total:
            raise CheckpointError(
                f"{Path(self.cfg.output) / 'checkpoint.pth'} was made for another recipe (the "
                "protocol, --epochs and --epoch-length decide the schedule); pass the same ones."
            )
        self.grid.load_state_dict(ck["grid"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.start_epoch, self.history = int(ck["epoch"]), list(ck.get("history", []))
        self.scores = ck.get("scores")
        set_rng_state(ck["rng"])
        progress.log(f"resuming from epoch {self.start_epoch} of {self.epochs}")

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        loss = self.grid.loss(tokens, labels)
        self.optimizer.zero_grad(set_to_none=False)  # the grads stay allocated: the big grid is memory-bound
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()) / len(self.grid.heads)

    def stopping(self) -> bool:
        self.signum = self.signum or self.run.poll()[0]
        return bool(self.signum)

    def end_epoch(self, epoch: int, loss: float, counts: torch.Tensor | None, n_val: int) -> None:
        ensure_finite_loss(
            loss, f"The heads' mean loss became {{loss}} in epoch {epoch + 1}; lower the learning rates."
        )
        row = {"epoch": epoch + 1, "iteration": (epoch + 1) * self.epoch_length, "loss": loss,
               "lr": self.optimizer.param_groups[0]["lr"]}  # fmt: skip
        if counts is not None:
            self.scores = [
                {"top1": percent(float(c[0]), n_val), "top5": percent(float(c[1]), n_val)} for c in counts
            ]
            best = choose_head([s["top1"] for s in self.scores])
            row.update(best_head=self.grid.specs[best].name(self.scale), top1=self.scores[best]["top1"])
        self.history.append(row)
        best_state = self._chosen_state()
        with self.run.saving():
            if dist_env().is_main:
                append_jsonl(Path(self.cfg.output) / "log.jsonl", row)
            self.run.write_checkpoint({
                "format": GRID_FORMAT, "epoch": epoch + 1, "epochs": self.epochs, "iterations": self.total,
                "grid": self.grid.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scores": self.scores, "history": self.history,
                "heads": [s.record(self.scale) for s in self.grid.specs], "identity": self.identity,
                "config": self.cfg.to_dict(), "rng": get_rng_state(),
                # the chosen head, as --evaluate --linear-weights reads it
                **({"state_dict": best_state} if best_state is not None else {}),
            })  # fmt: skip
        self.signum = self.signum or self.run.agreed_signal()

    def _chosen_state(self) -> dict | None:
        if not self.scores:
            return None
        head = self.grid.heads[choose_head([s["top1"] for s in self.scores])]
        return {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}


def run_cached(g: GridRun, progress: Progress) -> None:
    """The grid on token vectors computed once: each step a batch of them feeds every head."""
    d, cfg = g.data, g.cfg
    # the cached path has the token vectors
    assert d.train_x is not None and d.train_y is not None and d.val_x is not None and d.val_y is not None
    xs, ys = d.train_x.to(g.device), d.train_y.to(g.device)
    xv, yv = d.val_x.to(g.device), d.val_y.to(g.device)
    task = progress.task(
        "linear grid (cached features)", total=(g.run.end(g.epochs) - g.start_epoch) * g.epoch_length
    )
    for epoch in range(g.start_epoch, g.run.end(g.epochs)):
        g.grid.train()
        total = 0.0
        for it in range(epoch * g.epoch_length, (epoch + 1) * g.epoch_length):
            idx = batch_indices(d.n_train, cfg.batch_size, cfg.seed, it).to(g.device)
            total += g.step(xs[idx], ys[idx])
            task.advance(1, epoch=epoch + 1)
            if g.stopping():
                break
        if g.signum:
            break
        counts: torch.Tensor | None = None
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == g.epochs:
            g.grid.eval()
            parts = [grid_counts(g.grid, xv[s : s + 4096], yv[s : s + 4096]) for s in range(0, len(xv), 4096)]
            counts = sum(parts[1:], parts[0])
        g.end_epoch(epoch, total / g.epoch_length, counts, d.n_val)
        if g.signum:
            break
    task.close()


def run_images(g: GridRun, progress: Progress) -> None:
    """The grid on augmented images: one backbone forward per step gives every head its input."""
    d, cfg = g.data, g.cfg
    train_set, val_loader, model, dtype, device = d.images
    task = progress.task("linear grid (images)", total=(g.run.end(g.epochs) - g.start_epoch) * g.epoch_length)
    for epoch in range(g.start_epoch, g.run.end(g.epochs)):
        its = range(epoch * g.epoch_length, (epoch + 1) * g.epoch_length)
        batches = [batch_indices(d.n_train, cfg.batch_size, cfg.seed, it).tolist() for it in its]
        loader = torch.utils.data.DataLoader(
            train_set,
            batch_sampler=batches,
            num_workers=cfg.num_workers,
            collate_fn=collate_skip_none,
            pin_memory=device.type == "cuda",
        )
        g.grid.train()
        total = 0.0
        for x, y, _ in readable_batches(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad(), autocast(device, dtype):
                tokens = token_vector(model, x, d.k)
            total += g.step(tokens.float(), y)
            task.advance(1, epoch=epoch + 1)
            if g.stopping():
                break
        if g.signum:
            break
        counts = None
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == g.epochs:
            g.grid.eval()
            counts = torch.zeros(len(g.grid.heads), 2, dtype=torch.float64)
            for x, y, _ in readable_batches(val_loader):
                with torch.no_grad(), autocast(device, dtype):
                    tokens = token_vector(model, x.to(device), d.k)
                counts += grid_counts(g.grid, tokens.float(), y.to(device))
        g.end_epoch(epoch, total / g.epoch_length, counts, d.n_val)
        if g.signum:
            break
    task.close()


def train_grid(
    cfg,
    run: TrainingRun,
    protocol: str,
    feature_spec,
    train_transform,
    progress: Progress = NULL_PROGRESS,
    cached: bool = False,
    missing: str | None = None,
) -> dict[str, Any]:
    """Train ``protocol``'s grid inside ``run`` and return what the result needs: the heads with
    their validation scores, the chosen one, the data's sizes and the schedule's progress."""
    if is_dist():
        raise DinokitError(f"The {protocol} grid runs in one process; start dinokit linear without torchrun.")
    backbone = prepare_backbone(cfg, missing=missing) if cfg.train_features is None else None
    specs = grid_specs(cfg, protocol, getattr(backbone.model, "depth", None) if backbone else None)
    if cached:
        data, specs = cached_grid_data(cfg, specs, backbone, feature_spec, progress)
    else:
        data = image_grid_data(cfg, specs, backbone, feature_spec, train_transform)
    epoch_length = cfg.epoch_length or EPOCH_LENGTH
    identity = {"mode": f"grid-{'features' if cached else 'images'}", "protocol": protocol,
                "feature_fingerprint": {k: v for k, v in data.fingerprint.items() if k != "data"},
                "classes": data.classes, "heads": [s.record(1.0)["name"] for s in specs],
                "batch_size": cfg.batch_size, "seed": cfg.seed, "epoch_length": epoch_length}  # fmt: skip
    device = data.images[4] if data.images else resolve_device(cfg.device)
    g = GridRun(cfg, run, data, specs, cfg.epochs, epoch_length, identity, device)
    g.maybe_resume(progress)
    (run_cached if cached else run_images)(g, progress)
    heads = [{**s.record(g.scale), **(g.scores[i] if g.scores else {})} for i, s in enumerate(g.grid.specs)]
    chosen = heads[choose_head([h["top1"] for h in heads])] if g.scores else None
    done = g.history[-1]["epoch"] if g.history else g.start_epoch
    return {
        "heads": heads,
        "chosen": chosen,
        "data": data,
        "epochs_done": done,
        "signal": g.signum,
        "epoch_length": epoch_length,
        "epochs_run": len(g.history),
    }
