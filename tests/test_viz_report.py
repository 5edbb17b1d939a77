"""report.html: self-contained (figures embedded, no network), with the metrics."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from medreg.core import Grid, Image, InputError
from medreg.viz import save_qc, write_report


class _Refs(HTMLParser):
    """Collects every URL-bearing attribute and checks that tags are closed."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.stack: list[str] = []
        self.void = {"meta", "img", "br", "link", "input", "hr"}

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href", "srcset", "action", "data") and v is not None:
                self.refs.append((tag, k, v))
        if tag not in self.void:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()


def _outdir(tmp_path):
    grid = Grid((20, 18, 12))
    rng = np.random.default_rng(0)
    img = Image(torch.from_numpy(rng.random(grid.shape).astype(np.float32)), grid, "f.nii.gz")
    save_qc(tmp_path / "qc.png", img, img, panel_px=100, header_px=30)
    metrics = {
        "labels": {"mean_dice": 0.8123, "mean_hd95": 2.5, "absent_labels": [7],
                   "per_label": [{"label": 1, "name": "<Cortex & co>", "status": "ok",
                                  "dice": 0.8123, "hd95": 2.5, "assd": 0.7,
                                  "voxels_fixed": 10, "voxels_warped": 12},
                                 {"label": 7, "name": "", "status": "absent", "dice": None}]},
        "displacement": {"sdlogj": 0.05, "folding_percent": 0.0},
        "landmarks": {"mean": 1.5, "std": 0.2, "median": 1.4, "p90": 1.9, "max": 2.2,
                      "per_landmark": [1.5], "initial": {"mean": 5.0}},
        "settings": {"preset": "fast", "levels": [4, 2, 1]},
        "runtime_s": 12.5,
        "versions": {"medreg": "0.1.0", "torch": "2.x"},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    return tmp_path


def test_report_is_self_contained(tmp_path):
    d = _outdir(tmp_path)
    out = write_report(d)
    assert out == d / "report.html"
    text = out.read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(text)
    parser.close()
    assert parser.stack == []
    # every reference is an embedded data: URI: nothing to fetch, opens offline
    assert parser.refs and all(v.startswith("data:") for _, _, v in parser.refs)
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text.lower())
    assert "<script" not in text.lower() and "@import" not in text
    img = next(v for t, k, v in parser.refs if t == "img")
    assert base64.b64decode(img.split(",", 1)[1]) == (d / "qc.png").read_bytes()
    # metrics, escaping, settings, versions
    assert "0.8123" in text and "&lt;Cortex &amp; co&gt;" in text
    assert "absent from both maps" in text
    assert "fast" in text and "12.5" in text
    assert "at registration" in text and "numpy" in text


def test_report_errors(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        write_report(tmp_path / "missing")
    with pytest.raises(InputError, match="nothing to report"):
        write_report(tmp_path)
    (tmp_path / "metrics.json").write_text("{oops")
    with pytest.raises(InputError, match="invalid JSON"):
        write_report(tmp_path)


def test_report_reads_register_style_metrics(tmp_path):
    """``medreg register`` names the sections labels_after / jacobian."""
    metrics = {"jacobian": {"sdlogj": 0.0321, "folding_percent": 0.0},
               "labels_after": {"mean_dice": 0.8765, "per_label": [
                   {"label": 3, "name": "", "status": "ok", "dice": 0.8765}]},
               "dice_before": 0.51, "preset_config": {"name": "fast"}, "fixed": "f.nii.gz",
               "history": [{"level": 0, "loss": 1.0}]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    text = write_report(tmp_path).read_text()
    assert "0.8765" in text and "0.0321" in text and "Dice before" in text
    assert "preset_config.name" in text and "f.nii.gz" in text
