"""Fine-tune only the crop network of a trained checkpoint, with the point-map term on.

    python -m training.crop_finetune --checkpoint runs/mix_tall_gpu/best.ckpt \
        --manifest runs/mix/manifest.csv --out runs/mix_tall_crop/best.ckpt [--epochs 3] [--map-weight 1.0]

A Lightning run of :class:`CropFinetuneSystem` (the :class:`training.system.FractureSystem` of
the checkpoint, trained on its crop losses only) with the film network frozen by
:class:`FreezeFilmNetwork`. The film network (the expensive part at 768 x 320) is not even run,
so an epoch costs only the crops. The data are the checkpoint's training split of the manifest
(its ``val_fraction`` and seed; ``split = test`` rows are never read). Writes a copy of the
checkpoint whose ``vertebra_net.*`` weights are replaced, with ``crop_map_weight`` set in its
hyper-parameters and a ``crop_finetune`` record; re-calibrate it before use (the crop
probabilities change too).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning

from data.dataset import SpineDataModule
from data.io_utils import atomic_write_with
from training.checkpoint import load_checkpoint
from training.system import FractureSystem

CROP_PREFIX = "vertebra_net."


class FreezeFilmNetwork(BaseFinetuning):
    """Keeps the film network (``net``) frozen for the whole run, batch norm included."""

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.net, train_bn=False)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        pass  # never unfrozen


class CropFinetuneSystem(FractureSystem):
    """A :class:`FractureSystem` that trains on the crop network's losses only
    (:meth:`FractureSystem.crop_losses`), with AdamW and a cosine decay over every step and no
    warm-up, and records each epoch's mean losses in ``history``."""

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.history: list[dict] = []
        self._loss_sums: dict[str, float] = {}
        self._batches = 0

    def training_step(self, batch: dict, batch_idx: int):
        if "crops" not in batch:
            return None  # no vertebra crop in this batch: no step
        losses = self.crop_losses(batch)
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["crops"]))
        for k, v in losses.items():
            self._loss_sums[k] = self._loss_sums.get(k, 0.0) + v.item()
        self._batches += 1
        return loss

    def on_train_epoch_end(self) -> None:
        self.history.append({"epoch": self.current_epoch,
                             **{k: v / max(self._batches, 1) for k, v in self._loss_sums.items()}})
        self._loss_sums, self._batches = {}, 0
        self.print(f"epoch {self.current_epoch + 1}: "
                   + ", ".join(f"{k} {v:.4f}" for k, v in self.history[-1].items() if k != "epoch"))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # the crop network's: the film network is frozen
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def finetune(checkpoint: Path, manifest: Path, out: Path, epochs: int, lr: float, map_weight: float,
             batch_size: int, num_workers: int, limit_batches: int | None = None, seed: int = 0) -> dict:
    """Fine-tune the crop network of ``checkpoint`` on the training split of ``manifest``, write the
    result to ``out`` (:func:`write_finetuned`) and return the run's record."""
    L.seed_everything(seed, workers=True)
    ckpt = load_checkpoint(checkpoint)
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    hp.update(init_from=None, pretrained=None, crop_map_weight=map_weight, lr=lr)
    system = CropFinetuneSystem(**hp)
    system.load_state_dict(ckpt["state_dict"])
    dhp = ckpt.get("datamodule_hyper_parameters", {})
    # the film input is not used here: a small one keeps the data loader cheap
    dm = SpineDataModule(manifest=str(manifest), image_size=(64, 64), batch_size=batch_size,
                         num_workers=num_workers, val_fraction=dhp.get("val_fraction", 0.15),
                         split_seed=dhp.get("split_seed", 0), crop_jitter=dhp.get("crop_jitter", 2.0))
    dm.setup("fit")
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=limit_batches or 1.0, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[FreezeFilmNetwork()])
    t0 = time.time()
    trainer.fit(system, train_dataloaders=dm.train_dataloader())
    record = {"from": str(checkpoint), "manifest": str(manifest), "epochs": epochs, "lr": lr,
              "map_weight": map_weight, "batch_size": batch_size, "steps": int(trainer.global_step),
              "seconds": round(time.time() - t0, 1), "history": system.history}
    crop_state = {f"{CROP_PREFIX}{k}": v.detach().cpu().clone() for k, v in system.vertebra_net.state_dict().items()}
    write_finetuned(ckpt, crop_state, record, out)
    return record


def write_finetuned(checkpoint: dict, crop_state: dict[str, torch.Tensor], record: dict, out: Path) -> None:
    """Write a copy of ``checkpoint`` to ``out`` (atomically) with the crop network's weights
    ``crop_state`` (``vertebra_net.*`` keys), ``crop_map_weight`` and the ``crop_finetune``
    ``record``, and without optimizer state (it belongs to the weights it replaced)."""
    tuned = {k: v for k, v in checkpoint.items() if k not in ("optimizer_states", "lr_schedulers")}
    tuned["state_dict"] = {**checkpoint["state_dict"], **crop_state}
    tuned["hyper_parameters"] = {**checkpoint["hyper_parameters"], "crop_map_weight": record["map_weight"]}
    tuned["crop_finetune"] = record
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out, lambda fh: torch.save(tuned, fh))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--map-weight", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--limit-batches", type=int, default=None, help="batches per epoch (trials)")
    a = p.parse_args(argv)
    record = finetune(a.checkpoint, a.manifest, a.out, a.epochs, a.lr, a.map_weight, a.batch_size,
                      a.num_workers, a.limit_batches)
    print(f"wrote {a.out} ({record['steps']} steps in {record['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
