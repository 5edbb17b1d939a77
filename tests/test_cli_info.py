"""``medreg info``: readable summary, JSON output, one-line errors with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

from medreg.cli import main
from medreg.core import Image
from medreg.io import write_image


def _write(tmp_path, grid, name="img.nii.gz"):
    data = torch.arange(float(grid.numel)).reshape(1, *grid.shape)
    path = tmp_path / name
    write_image(Image(data, grid), path)
    return path


def test_info_prints_orientation_and_size(tmp_path, oblique_grid3d):
    path = _write(tmp_path, oblique_grid3d)
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    lines = {ln.split(None, 1)[0]: ln.split(None, 1)[1] for ln in result.output.splitlines()
             if ln[:1].strip()}
    assert lines["size"].startswith("23 x 31 x 17")
    assert lines["orientation"] == oblique_grid3d.orientation()
    assert lines["spacing"] == "0.9 x 1.3 x 2.5 mm"
    assert lines["range"] == f"0 .. {oblique_grid3d.numel - 1}"
    assert lines["dtype"] == "float32"


def test_info_json(tmp_path, oblique_grid2d):
    path = _write(tmp_path, oblique_grid2d, "img.mha")
    result = CliRunner().invoke(main, ["info", "--json", str(path)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["size"] == [29, 37] and info["orientation"] == oblique_grid2d.orientation()
    assert np.allclose(info["direction"], oblique_grid2d.direction)


def test_info_missing_file_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path / "missing.nii.gz")])
    assert result.exit_code == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medreg info: error:")
    assert "missing.nii.gz" in err[0]


def test_reuse_freed_memory_applies_on_glibc_and_respects_the_users_settings(monkeypatch):
    import platform

    from medreg.cli._memory import reuse_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert reuse_freed_memory() is False  # the user's own glibc setting wins
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    applied = reuse_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied is True
    else:
        assert applied is False


def test_info_shows_the_raw_header_of_a_nifti_it_cannot_use(tmp_path):
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 5, 6))
    hdr.set_data_dtype(np.float32)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]  # z collapsed
    path = tmp_path / "singular.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), None, header=hdr), str(path))
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 2
    assert "raw header" in result.stdout and "4 x 5 x 6" in result.stdout and "sform" in result.stdout
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "singular" in err[0] and "singular.nii.gz" in err[0]
