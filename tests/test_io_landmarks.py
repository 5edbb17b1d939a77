"""Landmark IO: csv / fcsv / mrk.json / elastix text, RAS↔LPS at the edge, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medreg.core import Frame, InputError
from medreg.io import read_landmarks, read_named_landmarks, write_landmarks

POINTS = torch.tensor([[1.5, -2.25, 3.0], [-100.125, 0.1, 1e-7], [0.0, 7.0, -1204.5]],
                      dtype=torch.float64)


@pytest.mark.parametrize("name", ["p.csv", "p.fcsv", "p.mrk.json", "p.txt", "p.pts"])
def test_round_trip_is_exact(tmp_path, name):
    write_landmarks(POINTS, tmp_path / name)
    back = read_landmarks(tmp_path / name)
    assert back.dtype == torch.float64 and torch.equal(back, POINTS)


@pytest.mark.parametrize("name", ["p.csv", "p.txt"])
def test_2d_round_trip(tmp_path, name):
    pts = POINTS[:, :2].numpy()
    write_landmarks(pts, tmp_path / name)
    assert torch.equal(read_landmarks(tmp_path / name), POINTS[:, :2])


def test_fcsv_ras_is_flipped_to_lps(tmp_path):
    text = (
        "# Markups fiducial file version = 4.11\n"
        "# CoordinateSystem = RAS\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_0,10.5,-20,30,0,0,0,1,1,1,0,F-1,,vtkMRMLScalarVolumeNode1\n"
        "vtkMRMLMarkupsFiducialNode_1,-1,2,-3,0,0,0,1,1,1,0,F-2,,\n"
    )
    (tmp_path / "ras.fcsv").write_text(text)
    expected = torch.tensor([[-10.5, 20.0, 30.0], [1.0, -2.0, -3.0]], dtype=torch.float64)
    assert torch.equal(read_landmarks(tmp_path / "ras.fcsv"), expected)
    # LPS header (and Slicer 4's numeric codes): no flip; 0 means RAS
    (tmp_path / "lps.fcsv").write_text(text.replace("= RAS", "= LPS"))
    assert torch.equal(read_landmarks(tmp_path / "lps.fcsv"), expected * torch.tensor([-1, -1, 1]))
    (tmp_path / "zero.fcsv").write_text(text.replace("= RAS", "= 0"))
    assert torch.equal(read_landmarks(tmp_path / "zero.fcsv"), expected)
    # our writer stores RAS
    write_landmarks(expected, tmp_path / "out.fcsv")
    out = (tmp_path / "out.fcsv").read_text()
    assert "CoordinateSystem = RAS" in out and ",10.5,-20.0,30.0," in out


def test_fcsv_columns_line_is_honoured(tmp_path):
    (tmp_path / "cols.fcsv").write_text(
        "# CoordinateSystem = LPS\n# columns = label,z,y,x\nA,3,2,1\n")
    assert read_landmarks(tmp_path / "cols.fcsv").tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize("name", ["p.csv", "p.fcsv", "p.mrk.json"])
def test_names_round_trip(tmp_path, name):
    """Named landmarks (anatomical points, fiducials) keep their names through a write and a
    read; a CSV name with a comma is quoted (Slicer's .fcsv has no quoting: a space there)."""
    names = ["AC", "PC, left", "genu"]
    write_landmarks(POINTS, tmp_path / name, names=names)
    pts, back = read_named_landmarks(tmp_path / name)
    assert torch.equal(pts, POINTS)
    assert back == (["AC", "PC  left", "genu"] if name.endswith(".fcsv") else names)
    with pytest.raises(InputError, match="2 names for 3 landmarks"):
        write_landmarks(POINTS, tmp_path / ("again_" + name), names=names[:2])


def test_csv_headers_extra_columns_and_ras(tmp_path):
    (tmp_path / "named.csv").write_text("label,x,y,z,comment\nA,1,2,3,first\nB,4,5,6,\n")
    assert read_landmarks(tmp_path / "named.csv").tolist() == [[1, 2, 3], [4, 5, 6]]
    assert read_named_landmarks(tmp_path / "named.csv")[1] == ["A", "B"]
    (tmp_path / "ras.csv").write_text("label,r,a,s\nA,1,2,3\n")
    assert read_landmarks(tmp_path / "ras.csv").tolist() == [[-1, -2, 3]]
    (tmp_path / "bare.csv").write_text("1,2,3\n4,5,6\n")
    assert read_landmarks(tmp_path / "bare.csv").shape == (2, 3)
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match="bad.csv.*no coordinate columns"):
        read_landmarks(tmp_path / "bad.csv")
    (tmp_path / "text.csv").write_text("x,y,z\n1,two,3\n")
    with pytest.raises(InputError, match="text.csv: line 2"):
        read_landmarks(tmp_path / "text.csv")


def test_mrk_json_ras_is_flipped(tmp_path):
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                        "controlPoints": [{"position": [1.0, 2.0, 3.0]}]}]}
    (tmp_path / "m.mrk.json").write_text(json.dumps(doc))
    assert read_landmarks(tmp_path / "m.mrk.json").tolist() == [[-1.0, -2.0, 3.0]]


def test_elastix_index_file_needs_a_grid(tmp_path, oblique_grid3d):
    (tmp_path / "idx.txt").write_text("index\n2\n0 0 0\n1 2 3\n")
    with pytest.raises(InputError, match="idx.txt: the points are voxel indices"):
        read_landmarks(tmp_path / "idx.txt")
    pts = read_landmarks(tmp_path / "idx.txt", grid=oblique_grid3d)
    expected = oblique_grid3d.transform_points(
        torch.tensor([[0.0, 0, 0], [1, 2, 3]], dtype=torch.float64), Frame.INDEX, Frame.WORLD)
    assert torch.allclose(pts, expected)
    assert torch.allclose(pts[0], torch.tensor(oblique_grid3d.origin, dtype=torch.float64))


def test_text_errors_and_plain_points(tmp_path):
    (tmp_path / "plain.pts").write_text("# my points\n1 2 3\n4 5 6  # second\n\n")
    assert read_landmarks(tmp_path / "plain.pts").tolist() == [[1, 2, 3], [4, 5, 6]]
    (tmp_path / "count.txt").write_text("point\n3\n1 2 3\n4 5 6\n")
    with pytest.raises(InputError, match="count.txt: the header announces 3 points but 2"):
        read_landmarks(tmp_path / "count.txt")
    (tmp_path / "ragged.txt").write_text("1 2 3\n4 5\n")
    with pytest.raises(InputError, match="ragged.txt"):
        read_landmarks(tmp_path / "ragged.txt")
    with pytest.raises(InputError, match="nothere.csv: no such file"):
        read_landmarks(tmp_path / "nothere.csv")


def test_transformix_output_points(tmp_path):
    (tmp_path / "outputpoints.txt").write_text(
        "Point\t0\t; InputIndex = [ 1 2 3 ]\t; InputPoint = [ 1.0 2.0 3.0 ]\t; "
        "OutputIndexFixed = [ 4 5 6 ]\t; OutputPoint = [ 4.5 5.5 6.5 ]\t; "
        "Deformation = [ 3.5 3.5 3.5 ]\n")
    assert read_landmarks(tmp_path / "outputpoints.txt").tolist() == [[4.5, 5.5, 6.5]]


def test_write_checks(tmp_path):
    with pytest.raises(InputError, match="shape"):
        write_landmarks(np.zeros((3, 4)), tmp_path / "p.csv")
    with pytest.raises(InputError, match="3D points"):
        write_landmarks(np.zeros((3, 2)), tmp_path / "p.fcsv")
    with pytest.raises(InputError, match="does not exist"):
        write_landmarks(POINTS, tmp_path / "no" / "p.csv")
    write_landmarks(POINTS, tmp_path / "p.csv")
    with pytest.raises(InputError, match="exists"):
        write_landmarks(POINTS, tmp_path / "p.csv", overwrite=False)


@pytest.mark.data
def test_real_elastix_point_sets(shared_data):
    folder = shared_data / "elastix-lung-ct-masks-landmarks"
    counts = {"3DCT_lung_baseline_landmarks.txt": 100,
              "itkelastix_CT_3D_lung_fixed_point_set.txt": 100,
              "itkelastix_CT_3D_lung_moving_point_set.txt": 100,
              "itkelastix_CT_3D_lung_fixed_point_set_corrected.txt": 51,
              "itkelastix_CT_3D_lung_moving_point_set_corrected.txt": 51}
    pts = {name: read_landmarks(folder / name) for name in counts}
    for name, k in counts.items():
        assert pts[name].shape == (k, 3)
    first = pts["itkelastix_CT_3D_lung_fixed_point_set.txt"][0]
    assert first.tolist() == [-36.351, -36.974, -1204.5]
    # SOURCE.md: identity distance between the 51 corrected pairs has mean 35.27 mm
    dist = (pts["itkelastix_CT_3D_lung_fixed_point_set_corrected.txt"]
            - pts["itkelastix_CT_3D_lung_moving_point_set_corrected.txt"]).norm(dim=1)
    assert abs(float(dist.mean()) - 35.27) < 0.01
