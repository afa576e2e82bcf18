"""The LightningModule that trains :class:`models.network.FractureNet`.

Losses (unknown labels are masked out, never taken as negative):
* image fracture: BCE over images whose ``fracture`` is known;
* acute given fracture: BCE over fractured images whose acuity is known;
* heatmap: BCE + Dice (MONAI) against the fractured-vertebra masks, only on images whose
  vertebra truth is known (normal films count: they have no fractured pixel);
* vertebrae, on films with per-vertebra truth: a CenterNet focal loss on the body-centre
  heatmap, L1 on the point offsets and cross-entropy on the level at each body's centre cell;
  for the crop network, L1 on the six points (in units of the crop) and masked BCE on the
  vertebra's fracture and acuity labels.
"""
from __future__ import annotations

import importlib.metadata

import lightning as L
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torchmetrics.classification import BinaryAUROC

from data.vertebra_targets import CROP_SIZE, VERTEBRA_CHANNELS
from models.network import HEATMAP_STRIDE, TARGETS, FractureNet
from models.vertebra_net import VertebraNet, point_map_loss
from training.checkpoint import CHECKPOINT_FORMAT, load_network_weights


def centre_focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, over the films with ``weight`` 1, per body centre."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = (target >= 1.0).float()
    w = weight.view(-1, 1, 1, 1)
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos * w).sum()
    neg_loss = -(torch.log(1 - p) * p ** 2 * (1 - target) ** 4 * (1 - pos) * w).sum()
    return (pos_loss + neg_loss) / (pos * w).sum().clamp(min=1.0)


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(target)
    if not known.any():
        return logits.sum() * 0.0  # keeps the graph; no labelled item in this batch
    return F.binary_cross_entropy_with_logits(logits[known], target[known])


class FractureSystem(L.LightningModule):
    def __init__(self, backbone: str = "resnet18", pretrained: str | None = None, fpn_dim: int = 96,
                 dropout: float = 0.2, lr: float = 1e-3, weight_decay: float = 1e-4,
                 warmup_fraction: float = 0.05, acute_weight: float = 1.0, heatmap_weight: float = 1.0,
                 init_from: str | None = None, image_size: tuple[int, int] = (384, 320),
                 vertebra_weight: float = 1.0, crop_backbone: str = "resnet18", crop_map_weight: float = 0.0,
                 channels_last: bool = False, compile: bool | str = False):
        """``channels_last``: keep the networks' weights and inputs in the channels-last memory
        format (faster convolutions with tensor cores, e.g. under bf16 autocast,
        ``trainer.precision: bf16-mixed``). ``compile``: compile both networks with
        ``torch.compile`` when training starts (true: the default inductor backend; or a backend's
        name); a one-off cost of a minute or more, which pays on long GPU runs. Neither changes
        the weights or what the checkpoint holds."""
        super().__init__()
        self.save_hyperparameters()
        self.net = FractureNet(backbone=backbone, pretrained=pretrained, fpn_dim=fpn_dim, dropout=dropout)
        self.vertebra_net = VertebraNet(backbone=crop_backbone, dropout=dropout)
        if init_from:
            load_network_weights(self.net, init_from, self.vertebra_net)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.vertebra_net.to(memory_format=torch.channels_last)
        self.compiled = False
        self.dice = DiceLoss(sigmoid=True, reduction="none")
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{t}": BinaryAUROC() for stage in ("val", "test") for t in TARGETS + ("vertebra_fracture",)})
        self.failed_images = 0

    @property
    def backbone(self) -> torch.nn.Module:
        """For Lightning's BackboneFinetuning callback (freeze, then unfreeze at a milestone)."""
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x.contiguous(memory_format=self.memory_format))

    def configure_model(self) -> None:
        """Compile the networks in place (``compile``): their state dicts keep their keys."""
        if self.hparams.compile and not self.compiled:
            backend = "inductor" if self.hparams.compile is True else str(self.hparams.compile)
            self.net.compile(backend=backend)
            self.vertebra_net.compile(backend=backend)
            self.compiled = True

    # ------------------------------------------------------------------ losses
    def batch_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every loss of a collated batch (``loss``: their weighted sum), as a training step computes them."""
        return self._losses(batch, self(batch["image"]))

    def _losses(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        logits = out["logits"]
        loss_fracture = masked_bce(logits[:, 0], batch["fracture"])
        loss_acute = masked_bce(logits[:, 1], batch["acute"])
        hm_logits = out["heatmap_logits"]
        target = F.adaptive_avg_pool2d(batch["heatmap_target"].float(), hm_logits.shape[-2:])
        known = batch["heatmap_known"]  # (B, channels)
        if known.sum() > 0:
            bce = F.binary_cross_entropy_with_logits(hm_logits, target, reduction="none").mean(dim=(2, 3))
            dice = self.dice(hm_logits, target).reshape(bce.shape)
            # Dice is undefined on empty masks, so only fractured images contribute it.
            has_fg = (target.flatten(2).amax(-1) > 0).float()
            loss_heatmap = ((bce * known).sum() + (dice * known * has_fg).sum()) / known.sum()
        else:
            loss_heatmap = hm_logits.sum() * 0.0
        vertebra = self._vertebra_losses(batch, out)
        total = (loss_fracture + self.hparams.acute_weight * loss_acute + self.hparams.heatmap_weight * loss_heatmap
                 + self.hparams.vertebra_weight * sum(vertebra.values()))
        return {"loss": total, "fracture": loss_fracture, "acute": loss_acute, "heatmap": loss_heatmap, **vertebra}

    def _vertebra_losses(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        """Stage-1 detection losses and the crop network's losses (see the module docstring)."""
        logits = out["vertebra_logits"].float()
        zero = logits.sum() * 0.0
        # tied to the crop network's weights, so a batch without crops still gives them a (zero)
        # gradient: DDP otherwise waits for gradients that never come
        crop_zero = sum(p.sum() for p in self.vertebra_net.parameters()) * 0.0
        if "vert_centre" not in batch:
            return {"centre": zero, "points": zero, "level": zero,
                    "crop_points": crop_zero, "crop_fracture": crop_zero, "crop_acute": crop_zero}
        known = batch["vert_known"]
        losses = {"centre": centre_focal_loss(logits[:, :1], batch["vert_centre"], known)}
        mask = batch["vert_offset_mask"] * known.view(-1, 1, 1)
        n = mask.sum()
        if n > 0:
            err = (logits[:, 1:13] - batch["vert_offsets"]).abs().sum(dim=1)
            losses["points"] = (err * mask).sum() / (12 * n)
            level = torch.where(mask > 0, batch["vert_level"], torch.full_like(batch["vert_level"], -1))
            if (level >= 0).any():
                losses["level"] = F.cross_entropy(logits[:, 13:], level, ignore_index=-1)
            else:
                losses["level"] = zero
        else:
            losses["points"] = losses["level"] = zero
        losses.update(self.crop_losses(batch, out, crop_zero))
        return losses

    def crop_losses(self, batch: dict, out: dict | None = None, zero: torch.Tensor | None = None) -> dict:
        """The crop network's losses on the batch's crops (points, fracture, acute, and the point
        map term when ``crop_map_weight`` > 0); ``zero`` for each when the batch has no crop.
        Puts the crop outputs into ``out`` for validation metrics."""
        crops = self._crop_outputs(batch)
        if crops is None:
            if zero is None:
                zero = sum(p.sum() for p in self.vertebra_net.parameters()) * 0.0
            return {"crop_points": zero, "crop_fracture": zero, "crop_acute": zero}
        crop_out, sel = crops
        target = batch["crop_points"][sel]
        losses = {"crop_points": (crop_out["points"] - target).abs().mean() / CROP_SIZE * 10}
        if self.hparams.crop_map_weight > 0:  # off in the benchmarked recipes (see point_map_loss)
            losses["crop_map"] = self.hparams.crop_map_weight * point_map_loss(
                crop_out["log_prob"], target, self.vertebra_net.stride)
        losses["crop_fracture"] = masked_bce(crop_out["logits"][:, 0].float(), batch["crop_fracture"][sel])
        losses["crop_acute"] = masked_bce(crop_out["logits"][:, 1].float(), batch["crop_acute"][sel])
        if out is not None:
            out["crop_out"], out["crop_sel"] = crop_out, sel
        return losses

    def _crop_outputs(self, batch: dict):
        if "crops" not in batch:
            return None
        sel = batch["crop_valid"] > 0
        if not sel.any():
            return None
        return self.vertebra_net(batch["crops"][sel].contiguous(memory_format=self.memory_format)), sel

    def training_step(self, batch: dict, batch_idx: int):
        self.failed_images += int(batch.get("n_failed", 0))
        if "image" not in batch:
            return None  # every image in this batch was unreadable
        losses = self._losses(batch, self(batch["image"]))
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(
                f"non-finite training loss at epoch {self.current_epoch}, batch {batch_idx} "
                f"(sample indices {batch['index'].tolist()}): "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
        n = len(batch["image"])
        self.log_dict({f"train/loss_{k}": v for k, v in losses.items() if k != "loss"}, batch_size=n)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=n)
        return losses["loss"]

    def on_train_epoch_end(self) -> None:
        self.log("train/failed_images", float(self.failed_images))
        if self.failed_images:
            print(f"epoch {self.current_epoch}: skipped {self.failed_images} unreadable image(s)")
        self.failed_images = 0

    def _eval_step(self, batch: dict, stage: str) -> None:
        if "image" not in batch:
            return
        out = self(batch["image"])
        losses = self._losses(batch, out)
        self.log(f"{stage}/loss", losses["loss"], batch_size=len(batch["image"]), sync_dist=True)
        probs = FractureNet.probabilities(out)
        frac = batch["fracture"]
        known = ~torch.isnan(frac)
        if known.any():
            self.metrics[f"{stage}_fracture"].update(probs["p_fracture"][known], frac[known].long())
        acute = batch["acute"]
        known = ~torch.isnan(acute)
        if known.any():
            self.metrics[f"{stage}_acute"].update(probs["p_acute"][known], acute[known].long())
        if "crop_out" in out:
            p_vertebra = torch.sigmoid(out["crop_out"]["logits"][:, 0].float())
            label = batch["crop_fracture"][out["crop_sel"]]
            known = ~torch.isnan(label)
            if known.any():
                self.metrics[f"{stage}_vertebra_fracture"].update(p_vertebra[known], label[known].long())

    def _log_metrics(self, stage: str) -> None:
        for t in TARGETS + ("vertebra_fracture",):
            metric = self.metrics[f"{stage}_{t}"]
            try:
                value = metric.compute()
            except (ValueError, RuntimeError):  # nothing seen, e.g. a sanity check
                value = torch.tensor(float("nan"))
            # AUROC of one class is undefined; log 0.5 so a monitor never sees NaN
            self.log(f"{stage}/auroc_{t}", torch.nan_to_num(value, nan=0.5), prog_bar=True, sync_dist=True)
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_fraction * total))
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.05, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=self.hparams.lr * 0.01),
        ], milestones=[warmup])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoint identity
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vcf_model"] = {
            "format": CHECKPOINT_FORMAT,
            "architecture": type(self.net).__name__,
            "backbone": self.hparams.backbone,
            "fpn_dim": self.hparams.fpn_dim,
            "targets": list(TARGETS),
            "heatmap_stride": HEATMAP_STRIDE,
            "vertebra_channels": VERTEBRA_CHANNELS,
            "crop_backbone": self.hparams.crop_backbone,
            "crop_size": CROP_SIZE,
            "image_size": list(self.hparams.image_size),
            "input_range": [0.0, 1.0],
            "code_version": _version(),
            "torch_version": ".".join(torch.__version__.split(".")),  # plain str: TorchVersion is not weights_only-safe
        }


def _version() -> str:
    try:
        return importlib.metadata.version("spine-vcf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
