"""Cohort summaries, Learn2Reg task files and label tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medreg.core import InputError
from medreg.metrics import (L2RPair, L2RTask, parse_label_list, read_label_list,
                            read_label_names, read_label_table, summarize_cohort)
from medreg.metrics.cohort import format_summary


def test_summarize_cohort_worst30_direction():
    rows = [{"pair": f"p{i}", "dice": d, "hd95": h, "flag": True, "details": {"x": 1}}
            for i, (d, h) in enumerate(zip([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
                                           range(10)))]
    rows.append({"pair": "p10", "dice": None, "hd95": float("nan")})
    s = summarize_cohort(rows)
    assert set(s) == {"dice", "hd95"}
    d, h = s["dice"], s["hd95"]
    assert d["n"] == 10 and d["n_missing"] == 1 and d["higher_is_better"]
    assert d["mean"] == pytest.approx(0.45)
    assert d["std"] == pytest.approx(np.std(np.arange(10) / 10))
    assert d["worst30"] == pytest.approx(np.mean([0.0, 0.1, 0.2]))  # the 3 lowest
    assert h["worst30"] == pytest.approx(np.mean([7, 8, 9]))  # the 3 highest
    assert d["q30_l2r"] == pytest.approx(np.quantile(np.arange(10) / 10, 0.3))
    json.dumps(s, allow_nan=False)
    assert "dice" in format_summary(s)


def test_summarize_cohort_small_and_empty():
    s = summarize_cohort([{"tre": 2.0}])
    assert s["tre"]["worst30"] == 2.0 and s["tre"]["std"] == 0.0
    assert summarize_cohort([]) == {}
    s = summarize_cohort([{"tre": None}])
    assert s == {}


def test_l2r_task_from_dataset_json(tmp_path):
    desc = {
        "name": "OASIS", "labels": {"0": "background", "1": "Cortex", "2": "WM"},
        "registration_val": [
            {"fixed": "./imagesTr/OASIS_0395_0000.nii.gz",
             "moving": "./imagesTr/OASIS_0396_0000.nii.gz"}],
        "registration_test": [],
    }
    (tmp_path / "OASIS_dataset.json").write_text(json.dumps(desc))
    (tmp_path / "labelsTr").mkdir()
    for s in ("0395", "0396"):
        (tmp_path / "labelsTr" / f"OASIS_{s}_0000.nii.gz").write_bytes(b"")
    task = L2RTask.from_json(tmp_path / "OASIS_dataset.json")
    assert task.name == "OASIS" and task.split == "registration_val"
    assert task.label_names == {1: "Cortex", 2: "WM"}
    assert task.metric_kinds() == {"sdlogj", "dice", "hd95"}
    assert task.labels_for("dice") == [1, 2]
    pair = task.pairs[0]
    assert pair.key == "0395_0000<--0396_0000"
    assert pair.displacement_names()[0] == "disp_0395_0396.nii.gz"
    assert task.label_path(pair.fixed) == tmp_path / "labelsTr" / "OASIS_0395_0000.nii.gz"
    assert task.landmark_path(pair.fixed, "keypoints").name == "OASIS_0395_0000.csv"
    preds = tmp_path / "preds"
    preds.mkdir()
    with pytest.raises(InputError, match="disp_0395_0396.nii.gz"):
        task.find_displacement(pair, preds)
    (preds / "disp_0395_0000_0396_0000.nii.gz").write_bytes(b"")
    assert task.find_displacement(pair, preds).name == "disp_0395_0000_0396_0000.nii.gz"
    with pytest.raises(InputError, match="registration_test"):
        L2RTask.from_json(tmp_path / "OASIS_dataset.json", split="test")


def test_l2r_task_from_evaluation_config(tmp_path):
    cfg = {"task_name": "NLST", "masked_evaluation": True,
           "evaluation_methods": [{"name": "TRE_kp", "metric": "tre", "dest": "keypoints"},
                                  {"name": "LogJacDetStd", "metric": "sdlogj"}],
           "eval_pairs": [{"fixed": "./imagesTr/NLST_0101_0000.nii.gz",
                           "moving": "./imagesTr/NLST_0101_0001.nii.gz"}]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    task = L2RTask.from_json(tmp_path / "cfg.json")
    assert task.masked and task.tre_dest() == "keypoints" and task.split == "eval_pairs"
    assert task.pairs[0].displacement_names()[0] == "disp_0101_0101.nii.gz"
    assert L2RPair("a/X_0001_0000.nii.gz", "a/X_0002_0003.nii.gz").displacement_names()[0] == \
        "disp_0001_0000_0002_0003.nii.gz"


def test_l2r_task_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        L2RTask.from_json(tmp_path / "bad.json")
    (tmp_path / "nopairs.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(InputError, match="no pairs"):
        L2RTask.from_json(tmp_path / "nopairs.json")
    (tmp_path / "badname.json").write_text(json.dumps(
        {"registration_val": [{"fixed": "a.nii.gz", "moving": "b.nii.gz"}]}))
    with pytest.raises(InputError, match="_XXXX_YYYY"):
        L2RTask.from_json(tmp_path / "badname.json")


# ------------------------------------------------------------------------------- label tables
ITKSNAP = """################################################
# ITK-SnAP Label Description File
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
    0     0    0    0        0  0  0    "Clear Label"
    1   255    0    0        1  1  1    "Left Hippocampus"
    2     0  255    0        1  1  1    "Right Hippocampus"
"""

FREESURFER = """#$Id: FreeSurferColorLUT.txt
#No. Label Name:                            R   G   B   A

0   Unknown                                 0   0   0   0
2   Left-Cerebral-White-Matter              245 245 245 0
17  Left-Hippocampus                        220 216 20  0
"""


def test_read_label_tables(tmp_path):
    (tmp_path / "snap.txt").write_text(ITKSNAP)
    (tmp_path / "FreeSurferColorLUT.txt").write_text(FREESURFER)
    (tmp_path / "names.json").write_text(json.dumps({"1": "a", "2": "b"}))
    (tmp_path / "list.json").write_text(json.dumps([{"id": 3, "name": "c", "color": [1, 2, 3]}]))
    snap = read_label_table(tmp_path / "snap.txt")
    assert snap[1].name == "Left Hippocampus" and snap[1].color == (255, 0, 0)
    fs = read_label_table(tmp_path / "FreeSurferColorLUT.txt")
    assert fs[17].name == "Left-Hippocampus" and fs[17].color == (220, 216, 20)
    assert read_label_names(tmp_path / "names.json") == {1: "a", 2: "b"}
    assert read_label_table(tmp_path / "list.json")[3].color == (1, 2, 3)
    ids, names = read_label_list(tmp_path / "FreeSurferColorLUT.txt")
    assert ids == [2, 17] and names[2] == "Left-Cerebral-White-Matter"


def test_label_lists(tmp_path):
    assert parse_label_list("2,3, 41") == [2, 3, 41]
    assert parse_label_list("1-4 7") == [1, 2, 3, 4, 7]
    assert parse_label_list("3,3,2") == [3, 2]
    with pytest.raises(InputError, match="not an integer"):
        parse_label_list("2,x")
    with pytest.raises(InputError, match="empty"):
        parse_label_list(" , ")
    (tmp_path / "eval_labels.txt").write_text("1,2,3\n10\n")
    assert read_label_list(tmp_path / "eval_labels.txt") == ([1, 2, 3, 10], {})
    (tmp_path / "empty.txt").write_text("0 Background\n")
    with pytest.raises(InputError, match="no labels"):
        read_label_list(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="not found"):
        read_label_list(tmp_path / "missing.txt")


def test_real_aal_names(shared_data):
    names = read_label_names(shared_data / "mricron-colin27-aal" / "aal.nii.txt")
    assert names[1] == "Precentral_L" and len(names) == 116
