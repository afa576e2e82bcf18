"""Fine-tune only the crop network of a trained model, with the point-map term on.

    python -m training.crop_finetune --model runs/mix_tall/bundle \
        --manifest runs/mix/manifest.csv --out runs/mix_tall_crop/bundle [--epochs 3] [--map-weight 1.0]

A Lightning run of :class:`CropFinetuneSystem` (the :class:`training.system.FractureSystem` of
the model's recorded hyper-parameters and weights, trained on its crop losses only) with the
film network frozen by :class:`FreezeFilmNetwork`. The film network (the expensive part at
768 x 320) is not even run, so an epoch costs only the crops. The data are the model's training
split of the manifest (its recorded ``val_fraction`` and seed; ``split = test`` rows are never
read). Writes a new version of the bundle (the input is never edited) whose crop network is
replaced, with ``crop_map_weight`` in its recorded hyper-parameters and the run's record in its
history, and without calibration: calibrate it again (the crop probabilities change too).
``--checkpoint CKPT`` instead of ``--model`` reads a training checkpoint, converted in memory.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning

from data.dataset import SpineDataModule
from evaluation.model_card import save_with_card
from inference.loading import open_model
from models.bundle import Bundle, BundleError, ModelError
from training.system import FractureSystem


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


def finetune(model, manifest: str | os.PathLike, out: str | os.PathLike, epochs: int, lr: float, map_weight: float,
             batch_size: int, num_workers: int, limit_batches: int | None = None, seed: int = 0) -> dict:
    """Fine-tune the crop network of ``model`` (a :class:`Bundle`, a bundle folder, a registry
    name or a training checkpoint) on the training split of ``manifest``, write the new version
    of its bundle to the folder ``out`` (:func:`write_finetuned`) and return the run's record."""
    out = Path(out)
    if not isinstance(model, Bundle) and out.resolve() == Path(model).resolve():
        raise BundleError(f"{out}: the output must differ from the input model (a model is never edited in place)")
    if out.exists():
        raise BundleError(f"{out}: already exists (choose a new folder for the fine-tuned bundle)")
    bundle = open_model(model)
    where = str(model) if not isinstance(model, Bundle) else bundle.describe()
    if bundle.crop_net is None:
        raise BundleError(f"{where}: no crop network to fine-tune")
    training = bundle.metadata.get("training") or {}
    if not training.get("hyper_parameters"):
        raise BundleError(f"{where}: no training hyper-parameters recorded; fine-tune from the training checkpoint")
    L.seed_everything(seed, workers=True)
    hp = {k: v for k, v in training["hyper_parameters"].items() if not k.startswith("_")}
    # the original run's speed options (channels_last, compile) are not the fine-tune's
    hp.update(init_from=None, pretrained=None, crop_map_weight=map_weight, lr=lr, channels_last=False, compile=False)
    system = CropFinetuneSystem(**hp)
    system.net.load_state_dict(bundle.film_net.state_dict())
    system.vertebra_net.load_state_dict(bundle.crop_net.state_dict())
    dhp = training.get("data") or {}
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
    record = {"from": where, "manifest": str(manifest), "epochs": epochs, "lr": lr,
              "map_weight": map_weight, "batch_size": batch_size, "steps": int(trainer.global_step),
              "seconds": round(time.time() - t0, 1), "history": system.history}
    write_finetuned(bundle, copy.deepcopy(system.vertebra_net).cpu().eval(), record, out)
    return record


def write_finetuned(model: Bundle, crop_net: torch.nn.Module, record: dict, out: str | os.PathLike) -> Path:
    """Write a new version of ``model`` with the crop network ``crop_net`` to the bundle folder
    ``out``, with its model card: ``crop_map_weight`` set in its recorded hyper-parameters, the
    run's ``record`` in its history, and no calibration (it was fitted on the old crop network's
    probabilities). ``model`` is not changed; returns ``out``."""
    tuned = model.derive("crop fine-tune", note=f"crop network fine-tuned with crop_map_weight {record['map_weight']} "
                                                 f"on {record['manifest']}; calibrate again",
                         networks={"crop_net": crop_net}, calibration=None, record=record)
    training = tuned.metadata.setdefault("training", {})
    training["hyper_parameters"] = {**(training.get("hyper_parameters") or {}), "crop_map_weight": record["map_weight"]}
    return save_with_card(tuned, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a bundle folder or a registry name")
    source.add_argument("--checkpoint", help="a training checkpoint (.ckpt), converted to a bundle")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the new bundle folder (must not exist)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--map-weight", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--limit-batches", type=int, default=None, help="batches per epoch (trials)")
    a = p.parse_args(argv)
    try:
        record = finetune(a.model or a.checkpoint, a.manifest, a.out, a.epochs, a.lr, a.map_weight, a.batch_size,
                          a.num_workers, a.limit_batches)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} ({record['steps']} steps in {record['seconds']} s); calibrate it again: "
          f"python -m calibration --model {a.out} --manifest VAL.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
