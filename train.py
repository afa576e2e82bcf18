"""Train the fracture and acuity network (LightningCLI).

    python train.py fit --config configs/phantom.yaml
    python train.py fit --config configs/phantom.yaml --trainer.max_epochs 3 --data.batch_size 8
    python train.py fit --config configs/phantom.yaml --ckpt_path runs/phantom/last.ckpt   # resume
    python train.py fit --config configs/real_template.yaml --model.init_from runs/phantom/best.ckpt

The fully resolved config is saved beside every run (``config.yaml`` in the log folder). A
manifest with problems (docs/formats.md) stops the run before training, printing every problem
on a line of its own (exit status 2).
"""
from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from data.dataset import SpineDataModule
from data.tables import ManifestError
from training.system import FractureSystem


class FractureCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # one image size for the data and the model's metadata
        parser.link_arguments("data.image_size", "model.image_size")


def main(args: list[str] | None = None) -> FractureCLI:
    return FractureCLI(FractureSystem, SpineDataModule, seed_everything_default=0,
                       save_config_kwargs={"overwrite": True}, args=args)


def run(args: list[str] | None = None) -> int:
    """:func:`main`, with its exit status: 2 for a manifest with problems, printed one a line."""
    try:
        main(args)
    except ManifestError as exc:
        print("error: " + "\n".join(exc.lines()), file=sys.stderr)
        return 2
    return 0


def cli() -> int:
    """Console-script entry point (its return value is the exit status)."""
    return run()


if __name__ == "__main__":
    sys.exit(run())
