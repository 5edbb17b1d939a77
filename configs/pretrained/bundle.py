"""Ship a trained model in the package: ``src/medreg/models/<name>.pt`` and its card ``<name>.json``.

The checkpoint is rewritten without resume state (optimiser, RNG), so only the weights, the
network config, the preprocessing and the training config travel. The card (read by
``medreg models``) says what the model is for, what it was trained on (with licence), how long
training took, and the numbers measured with it (each with the command that produced it).

    python configs/pretrained/bundle.py hippocampus ../runs/hippocampus/last.pt \\
        --card configs/pretrained/hippocampus.card.json
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from medreg.train.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def training_seconds(run: Path) -> float | None:
    """Wall time of the run from its CSV log (the ``time_s`` of the last row), if present."""
    log = run / "train_log.csv"
    if not log.exists():
        return None
    rows = list(csv.DictReader(open(log)))
    for key in ("seconds", "elapsed_s", "time_s", "wall_s"):
        if rows and key in rows[-1]:
            return float(rows[-1][key])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--card", type=Path, required=True, help="card template (JSON) with the texts and results")
    a = ap.parse_args()
    loaded = load_checkpoint(a.checkpoint)
    dest = ROOT / "src" / "medreg" / "models" / f"{a.name}.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    card = json.loads(a.card.read_text())
    # the card's "inference" (e.g. {"symmetric": true}) travels in the checkpoint as the model's
    # defaults for medreg predict
    save_checkpoint(dest, model=loaded.net, preprocess=loaded.preprocess,
                    train_config=loaded.train_config, step=loaded.step, metrics=loaded.metrics,
                    inference=card.get("inference"))
    card["name"] = a.name
    card["network"] = loaded.net.config()
    card["parameters"] = sum(p.numel() for p in loaded.net.parameters())
    # a model fine-tuned in stages: the card template lists the earlier runs (config, steps,
    # wall_s) under training.earlier_stages; steps and wall time are the totals
    training = card.setdefault("training", {})
    earlier = training.get("earlier_stages", [])
    training["steps"] = loaded.step + sum(int(e["steps"]) for e in earlier)
    seconds = training_seconds(a.checkpoint.parent)
    if seconds is not None:
        training["wall_s"] = round(seconds + sum(float(e["wall_s"]) for e in earlier), 1)
    card["size_mb"] = round(dest.stat().st_size / 2 ** 20, 2)
    (dest.with_suffix(".json")).write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {dest} ({card['size_mb']} MB) and {dest.with_suffix('.json')}")


if __name__ == "__main__":
    main()
