"""Run the parity model through today's inference code (the one place the parity test and
the fixture writer share, so that both always run it the same way)."""
from __future__ import annotations

from pathlib import Path

from tests.parity.parity_model import FILMS_DIR, parity_checkpoint, with_content_readers


def run_parity_model(work: Path) -> Path:
    from inference.pipeline import run_inference
    from inference.predictor import Predictor

    checkpoint = parity_checkpoint(work / "parity.ckpt")
    predictor = with_content_readers(Predictor(checkpoint, device="cpu"))
    out = work / "out"
    summary = run_inference(predictor, [str(FILMS_DIR)], out, batch_size=2, num_workers=0, progress=False)
    if summary.n_failed:
        raise RuntimeError(f"parity run: {summary.n_failed} film(s) failed; see {out / 'errors.csv'}")
    return out
