"""The peer pipeline of the speed benchmark: torchxrayvision's DenseNet-121 over DICOM films.

    python -m benchmarks.xrv_peer FILMS_DIR --size 224 --out probs.csv [--batch-size 8] [--steady]

What a radiograph researcher runs with torchxrayvision, as its README shows it:
``xrv.utils.read_xray_dcm`` (16-bit DICOM to [-1024, 1024]), ``XRayCenterCrop``, ``XRayResizer``
(its default engine), DenseNet-121 in batches, sigmoid probabilities of its 18 pathologies to a
CSV. The network has random weights (``weights=None``): nothing is downloaded, and the cost of a
forward pass does not depend on the weights. ``--steady`` runs one batch first, then times the
whole folder again and prints the seconds per film as JSON (start-up and the first batch left
out). Needs torchxrayvision (``pip install -e .[bench]``).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path


def prepare(path: Path, size: int):
    """One film as torchxrayvision's models take it: (1, size, size) float32 in [-1024, 1024]."""
    import torchxrayvision as xrv

    img = xrv.utils.read_xray_dcm(path)[None]
    img = xrv.datasets.XRayCenterCrop()(img)
    return xrv.datasets.XRayResizer(size)(img)


def run(model, paths: list[Path], size: int, batch_size: int, out: Path | None) -> None:
    import numpy as np
    import torch

    rows = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x = torch.from_numpy(np.stack([prepare(p, size) for p in chunk]))
        with torch.no_grad():
            probs = torch.sigmoid(model(x)).numpy()
        rows += [[str(p)] + [f"{v:.6f}" for v in row] for p, row in zip(chunk, probs)]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image"] + list(model.targets))
            writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("films", help="folder of DICOM films (*.dcm)")
    parser.add_argument("--size", type=int, default=224, help="network input side (224 or 512)")
    parser.add_argument("--out", default=None, help="probabilities CSV")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steady", action="store_true", help="print the steady-state seconds per film as JSON")
    args = parser.parse_args(argv)
    try:
        import torchxrayvision as xrv
    except ImportError:
        print("error: torchxrayvision is not installed (pip install -e .[bench])", file=sys.stderr)
        return 2
    paths = sorted(Path(args.films).glob("*.dcm"))
    if not paths:
        print(f"error: {args.films}: no .dcm files", file=sys.stderr)
        return 2
    model = xrv.models.DenseNet(weights=None).eval()  # random weights: no download
    if not args.steady:
        run(model, paths, args.size, args.batch_size, Path(args.out) if args.out else None)
        return 0
    run(model, paths[:args.batch_size], args.size, args.batch_size, None)
    start = time.perf_counter()
    run(model, paths, args.size, args.batch_size, Path(args.out) if args.out else None)
    print(json.dumps({"seconds_per_film": (time.perf_counter() - start) / len(paths), "films": len(paths)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
