"""Fine-tune only the crop network of a trained checkpoint, with the point-map term on.

    python -m training.crop_finetune --checkpoint runs/mix_tall_gpu/best.ckpt \
        --manifest runs/mix/manifest.csv --out runs/mix_tall_crop/best.ckpt [--epochs 3] [--map-weight 1.0]

An experiment on 2 CPU cores: the film network (the expensive part at 768 x 320) is left
untouched and not even run, so an epoch costs only the crops. The data are the checkpoint's
training split of the manifest (its ``val_fraction`` and seed; ``split = test`` rows are never
read). Writes a copy of the checkpoint whose ``vertebra_net.*`` weights are replaced, with
``crop_map_weight`` set in its hyper-parameters and a ``crop_finetune`` record; re-calibrate
it before use (the crop probabilities change too).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm


from data.dataset import SpineDataModule
from data.io_utils import atomic_write_with
from training.checkpoint import load_checkpoint
from training.system import FractureSystem


def finetune(checkpoint: Path, manifest: Path, out: Path, epochs: int, lr: float, map_weight: float,
             batch_size: int, num_workers: int, limit_batches: int | None = None, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    ckpt = load_checkpoint(checkpoint)
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    hp.update(init_from=None, pretrained=None, crop_map_weight=map_weight)
    system = FractureSystem(**hp)
    system.load_state_dict(ckpt["state_dict"])
    dhp = ckpt.get("datamodule_hyper_parameters", {})
    # the film input is not used here: a small one keeps the data loader cheap
    dm = SpineDataModule(manifest=str(manifest), image_size=(64, 64), batch_size=batch_size,
                         num_workers=num_workers, val_fraction=dhp.get("val_fraction", 0.15),
                         split_seed=dhp.get("split_seed", 0), crop_jitter=dhp.get("crop_jitter", 2.0))
    dm.setup("fit")
    loader = dm.train_dataloader()
    steps = epochs * (min(len(loader), limit_batches) if limit_batches else len(loader))
    net = system.vertebra_net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=hp.get("weight_decay", 1e-4))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history, t0, step = [], time.time(), 0
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(loader, desc=f"crop fine-tune epoch {epoch + 1}/{epochs}", total=steps // epochs, leave=False)
        for i, batch in enumerate(bar):
            if limit_batches and i >= limit_batches:
                break
            if "crops" not in batch:
                continue
            losses = system.crop_losses(batch)
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            n += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch, **{k: v / max(n, 1) for k, v in sums.items()}})
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "epoch"))
    new_state = dict(ckpt["state_dict"])
    for k, v in system.state_dict().items():
        if k.startswith("vertebra_net."):
            new_state[k] = v.detach().clone()
    ckpt["state_dict"] = new_state
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "crop_map_weight": map_weight}
    record = {"from": str(checkpoint), "manifest": str(manifest), "epochs": epochs, "lr": lr,
              "map_weight": map_weight, "batch_size": batch_size, "steps": step,
              "seconds": round(time.time() - t0, 1), "history": history}
    ckpt["crop_finetune"] = record
    ckpt.pop("optimizer_states", None)
    ckpt.pop("lr_schedulers", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out, lambda fh: torch.save(ckpt, fh))
    return record


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
