"""`medreg predict` / `medreg.predict`: outputs on the fixed header, ITK reproduces the warp,
instance optimisation, model resolution and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner
from torch import nn

import medreg
from medreg.cli import main
from medreg.core import Grid, Image, InputError
from medreg.io import read_image, write_image
from medreg.nets.base import NetOutput, RegistrationNet, register_net
from medreg.train.checkpoint import load_checkpoint, save_checkpoint
from medreg.train.preprocess import PreprocessConfig, network_grid
from medreg.transforms import Identity, TranslationTransform, warp_image

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "medreg" / "data"


@register_net("constant_shift_test")
class ConstantShift(RegistrationNet):
    """Predicts the same voxel displacement everywhere (a learnable vector): a network whose
    output is known exactly, to check the geometry of the prediction path."""

    def __init__(self, ndim: int, shift: tuple[float, ...] = (0.0, 0.0)) -> None:
        super().__init__(ndim)
        self.shift = tuple(float(s) for s in shift)
        self.vector = nn.Parameter(torch.tensor(self.shift, dtype=torch.float32))

    def forward(self, fixed, moving, reg_weight=None):
        self.check_regularisation(reg_weight)
        n, shape = fixed.shape[0], fixed.shape[2:]
        disp = self.vector.view(1, -1, *([1] * len(shape))).expand(n, -1, *shape)
        return NetOutput(displacement=disp.to(fixed.dtype))


def slice2d() -> Image:
    """A real 2D slice (bundled Colin27, axial) on an oblique, anisotropic grid of odd size."""
    vol = read_image(BUNDLED / "colin27_t1_2mm.nii.gz")
    data = vol.data[:, 40].float()  # (1, y, x)
    c, s = np.cos(0.3), np.sin(0.3)
    grid = Grid((data.shape[2], data.shape[1]), (1.7, 2.3), (-20.0, 15.0), np.array([[c, -s], [s, c]]))
    return Image(data, grid, "slice")


@pytest.fixture(scope="module")
def pair2d(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred")
    fixed = slice2d()
    shift = TranslationTransform(2, [3.4, -2.1])  # fixed → moving, mm
    mgrid = Grid((117, 145), (2.0, 2.0), (-100.0, 8.0))  # covers the whole slice
    moving = warp_image(fixed, shift.inverse(), mgrid)
    write_image(fixed, tmp / "fixed.nii.gz")
    write_image(moving, tmp / "moving.nii.gz")
    labels = Image((fixed.data > fixed.data.mean()).long(), fixed.grid, "lab")
    write_image(labels, tmp / "fixed_lab.nii.gz")
    write_image(warp_image(labels, shift.inverse(), mgrid, interpolation="nearest"), tmp / "moving_lab.nii.gz")
    return tmp


def checkpoint(path: Path, shift=(0.0, 0.0), **prep) -> Path:
    net = ConstantShift(2, shift)
    cfg = PreprocessConfig(size=(48, 40), **prep)
    return save_checkpoint(path, model=net, preprocess=cfg, train_config={}, step=0)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_prediction_lands_on_the_fixed_grid_and_itk_reproduces_it(pair2d, tmp_path):
    ckpt = checkpoint(tmp_path / "m.pt", shift=(1.5, -0.5))
    out = tmp_path / "out"
    res = run("predict", ckpt, pair2d / "fixed.nii.gz", pair2d / "moving.nii.gz", "-o", out,
              "--fixed-labels", pair2d / "fixed_lab.nii.gz", "--moving-labels", pair2d / "moving_lab.nii.gz",
              "--quiet", "--initialisation", "none")
    assert res.exit_code == 0, (res.output, __import__("traceback").format_exception(*res.exc_info))
    for f in ("warped.nii.gz", "warped_labels.nii.gz", "transform.h5", "displacement.nii.gz", "metrics.json", "qc.png"):
        assert (out / f).is_file(), f
    fixed = sitk.ReadImage(str(pair2d / "fixed.nii.gz"))
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    assert warped.GetSize() == fixed.GetSize()
    assert np.allclose(warped.GetOrigin(), fixed.GetOrigin()) and np.allclose(warped.GetSpacing(), fixed.GetSpacing())
    assert np.allclose(warped.GetDirection(), fixed.GetDirection())
    # the displacement is the network's voxel shift in world mm of the network grid, everywhere
    fimg = read_image(pair2d / "fixed.nii.gz")
    ngrid = network_grid(fimg.grid, PreprocessConfig(size=(48, 40)))
    expect = ngrid.direction @ (np.array([1.5, -0.5]) * np.asarray(ngrid.spacing))
    disp = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64))
    assert np.allclose(disp.reshape(-1, 2), expect, atol=1e-4)
    moving = sitk.ReadImage(str(pair2d / "moving.nii.gz"), sitk.sitkFloat32)
    tx = sitk.ReadTransform(str(out / "transform.h5"))
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    ours = sitk.GetArrayFromImage(warped)
    assert np.abs(ours - ref)[2:-2, 2:-2].max() < 1e-3 * float(ours.max() - ours.min())
    m = json.loads((out / "metrics.json").read_text())
    assert m["preset_config"]["model"] == str(ckpt) and "dice_after" in m
    # the output folder is not overwritten silently
    res = run("predict", ckpt, pair2d / "fixed.nii.gz", pair2d / "moving.nii.gz", "-o", out, "--quiet")
    assert res.exit_code != 0 and "--overwrite" in res.output


def test_initial_alignment_and_instance_optimisation_recover_a_shift(pair2d, tmp_path):
    """A zero network: `com` initialisation removes most of the shift; instance optimisation
    then lowers the residual further (the known map is a 3.4/-2.1 mm translation)."""
    ckpt = checkpoint(tmp_path / "zero.pt")
    fixed, moving = read_image(pair2d / "fixed.nii.gz"), read_image(pair2d / "moving.nii.gz")
    pts = fixed.grid.points(dtype=torch.float64).reshape(-1, 2)
    inner = fixed.grid.transform_points(pts, "world", "index")
    keep = ((inner > 8) & (inner < torch.tensor(fixed.grid.size, dtype=torch.float64) - 8)).all(1)
    truth = pts + torch.tensor([3.4, -2.1], dtype=torch.float64)

    def error(result) -> float:
        mapped = result.transform.to(torch.float64)(pts)
        return float((mapped.detach() - truth)[keep].norm(dim=1).mean())

    none = medreg.predict(ckpt, fixed, moving, initialisation="none")
    com = medreg.predict(ckpt, fixed, moving, initialisation="com")
    io = medreg.predict(ckpt, fixed, moving, initialisation="none", instance_steps=40,
                        instance_method="adam")
    greedy = medreg.predict(ckpt, fixed, moving, initialisation="none", instance_steps=40)  # default
    affine = medreg.predict(ckpt, fixed, moving, initialisation="affine")
    assert error(none) == pytest.approx(float(np.hypot(3.4, 2.1)), abs=1e-3)
    assert error(com) < 0.5 * error(none)
    assert error(io) < 0.5 * error(none)
    assert error(greedy) < 0.5 * error(none)
    assert error(affine) < 0.25 * error(none)  # the classical affine preset before the network
    assert io.metrics["similarity_after"]["value"] < none.metrics["similarity_after"]["value"]
    with pytest.raises(InputError, match="instance-optimisation method"):
        medreg.predict(ckpt, fixed, moving, instance_steps=2, instance_method="lbfgs")


@register_net("centroid_shift_test")
class CentroidShift(RegistrationNet):
    """Predicts, everywhere, the offset (voxels) from the fixed image's intensity centroid to the
    moving image's: a network that reads its inputs, whose one-pass answer is approximate and
    whose second pass sees only what the first left over."""

    def __init__(self, ndim: int, integrate_steps: int = 0, bias: tuple[float, ...] = (0.0, 0.0)) -> None:
        super().__init__(ndim)
        self.integrate_steps = int(integrate_steps)
        self.bias = tuple(float(b) for b in bias)
        self.offset = nn.Parameter(torch.tensor(self.bias, dtype=torch.float32))

    def forward(self, fixed, moving, reg_weight=None):
        shape = fixed.shape[2:]
        axes = torch.meshgrid(*[torch.arange(n, dtype=fixed.dtype) for n in shape], indexing="ij")

        def centroid(img):
            w = img[0, 0].clamp_min(0)
            return torch.stack([(w * a).sum() / w.sum() for a in axes[::-1]])  # x, y order

        vec = centroid(moving) - centroid(fixed) + self.offset
        disp = vec.view(1, -1, *([1] * len(shape))).expand(fixed.shape[0], -1, *shape).contiguous()
        if self.integrate_steps:  # a constant velocity integrates to the same constant displacement
            return NetOutput(displacement=disp, velocity=disp)
        return NetOutput(displacement=disp)


def test_network_passes_compose(pair2d, tmp_path):
    """Each further pass registers the moving image resampled through the fields so far: a
    centroid-matching network's later passes only correct what is left (the total stays near the
    true shift instead of adding it again), and the composed field is closer to the truth than a
    single pass. 0 passes is refused."""
    ckpt = save_checkpoint(tmp_path / "c.pt", model=CentroidShift(2), preprocess=PreprocessConfig(size=(48, 40)),
                           train_config={}, step=0)
    fixed, moving = read_image(pair2d / "fixed.nii.gz"), read_image(pair2d / "moving.nii.gz")
    truth = torch.tensor([3.4, -2.1], dtype=torch.float64)
    results = {n: medreg.predict(ckpt, fixed, moving, initialisation="none", passes=n) for n in (1, 2, 3)}
    with torch.no_grad():
        err = {n: float((r.transform.displacement(fixed.grid).double().mean(dim=(2, 3))[0] - truth).norm())
               for n, r in results.items()}
    assert err[1] < 0.5 * float(truth.norm())          # one pass: roughly the shift
    assert err[3] < 0.5 * err[1], err                   # three: refined, not doubled or tripled
    assert results[3].config.passes == 3
    with pytest.raises(InputError, match="passes"):
        medreg.predict(ckpt, fixed, moving, passes=0)


def test_symmetric_prediction_averages_both_directions(pair2d, tmp_path):
    """``symmetric`` uses half the difference of the velocities predicted both ways: a bias that
    does not depend on the order of the images cancels, the antisymmetric part (the centroid
    offset) stays; a displacement-only model is refused with a clear error."""
    fixed, moving = read_image(pair2d / "fixed.nii.gz"), read_image(pair2d / "moving.nii.gz")
    prep = PreprocessConfig(size=(48, 40))

    def field(net, **kw):
        ckpt = save_checkpoint(tmp_path / "s.pt", model=net, preprocess=prep, train_config={}, step=0)
        res = medreg.predict(ckpt, fixed, moving, initialisation="none", **kw)
        with torch.no_grad():
            return res.transform.displacement(fixed.grid).double()

    clean = field(CentroidShift(2, integrate_steps=3))
    biased = field(CentroidShift(2, integrate_steps=3, bias=(2.0, -1.5)))
    sym = field(CentroidShift(2, integrate_steps=3, bias=(2.0, -1.5)), symmetric=True)
    assert float((biased - clean).norm(dim=1).min()) > 1.0   # the bias moves the plain prediction
    assert torch.allclose(sym, clean, atol=1e-3)              # and cancels in the symmetric one
    with pytest.raises(InputError, match="velocity"):
        field(CentroidShift(2), symmetric=True)
    # a model may carry the default (bundled brain3d does); an explicit False overrides it
    net = CentroidShift(2, integrate_steps=3, bias=(2.0, -1.5))
    ckpt = save_checkpoint(tmp_path / "d.pt", model=net, preprocess=prep, train_config={}, step=0,
                           inference={"symmetric": True})
    with torch.no_grad():
        default = medreg.predict(ckpt, fixed, moving, initialisation="none").transform.displacement(fixed.grid)
        off = medreg.predict(ckpt, fixed, moving, initialisation="none", symmetric=False).transform.displacement(fixed.grid)
    assert torch.allclose(default.double(), clean, atol=1e-3) and torch.allclose(off.double(), biased, atol=1e-3)
    bad = save_checkpoint(tmp_path / "b.pt", model=net, preprocess=prep, train_config={}, step=0,
                          inference={"symmetry": True})
    res = run("predict", bad, pair2d / "fixed.nii.gz", pair2d / "moving.nii.gz", "-o", tmp_path / "ob")
    assert res.exit_code == 2 and "unknown inference default" in res.output


def test_greedy_instance_settings_follow_the_fast_preset():
    """Greedy refinement takes the fast preset's greedy stage unless overridden, and refuses a
    regularisation it would not apply (it regularises by smoothing and the volume step; the
    volume step's size is the fast stage's finest level's)."""
    from medreg.engine import load_preset
    from medreg.train.predict import INSTANCE_DEFAULTS, INSTANCE_GREEDY_SIMILARITY, greedy_settings

    stage = next(s for s in load_preset("fast").stages if s.type == "greedy")
    got = greedy_settings(dict(INSTANCE_DEFAULTS))
    assert INSTANCE_GREEDY_SIMILARITY["window"] == stage.similarity["window"]
    assert got == {"similarity": INSTANCE_GREEDY_SIMILARITY, "greedy_lr": stage.lr,
                   "gradient_sigma": stage.gradient_sigma, "field_smoothing": stage.field_smoothing,
                   "log_jacobian": stage.log_jacobian[-1]}
    assert greedy_settings({**INSTANCE_DEFAULTS, "gradient_sigma": 2.5})["gradient_sigma"] == 2.5
    assert greedy_settings({**INSTANCE_DEFAULTS, "log_jacobian": 0})["log_jacobian"] == 0
    with pytest.raises(InputError, match="smoothing and a volume step"):
        greedy_settings({**INSTANCE_DEFAULTS, "regularisation": {"diffusion": 1.0}})


def test_checkpoint_round_trip_and_model_resolution(tmp_path):
    ckpt = checkpoint(tmp_path / "m.pt", shift=(0.25, 1.0), orientation="RA", initialisation="geometry")
    loaded = load_checkpoint(ckpt)
    assert loaded.preprocess.orientation == "RA" and loaded.preprocess.initialisation == "geometry"
    assert torch.equal(loaded.net.vector, torch.tensor([0.25, 1.0]))
    with pytest.raises(InputError, match="unknown model"):
        load_checkpoint("no_such_model")
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_bad_input_is_one_line(pair2d, tmp_path):
    ckpt = checkpoint(tmp_path / "m.pt")
    res = run("predict", ckpt, pair2d / "fixed.nii.gz", pair2d / "moving.nii.gz", "-o", tmp_path / "o",
              "--regularisation", "0.5")
    assert res.exit_code == 2 and "regularisation" in res.output and "Traceback" not in res.output
    vol = tmp_path / "vol.nii.gz"
    write_image(Image(torch.rand(1, 5, 6, 7), Grid((7, 6, 5)), "vol"), vol)
    res = run("predict", ckpt, vol, vol, "-o", tmp_path / "o3")
    assert res.exit_code == 2 and "2D" in res.output and "3D" in res.output
    res = run("predict", "no_such_model", pair2d / "fixed.nii.gz", pair2d / "moving.nii.gz", "-o", tmp_path / "o4")
    assert res.exit_code == 2 and "unknown model" in res.output


def test_models_command_lists_bundled_models():
    res = run("models")
    assert res.exit_code == 0
    from medreg.train.checkpoint import bundled_models

    for name in bundled_models():
        assert name in res.output
        card = json.loads(run("models", name).output)
        assert card["name"] == name and "training" in card and "results" in card
    res = run("models", "no_such_model")
    assert res.exit_code == 2 and "no bundled model" in res.output


def test_regularisation_input_of_a_conditional_model(pair2d, tmp_path):
    """A conditional (HyperMorph-like) network takes --regularisation: another weight gives
    another field; an untrained net with a perturbed head is enough to see the input used."""
    from medreg.nets import create

    torch.manual_seed(0)
    net = create("unet", ndim=2, features=[8, 16], decoder_features=[16, 8, 8], conditional=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = save_checkpoint(tmp_path / "cond.pt", model=net, preprocess=PreprocessConfig(size=(48, 40)),
                           train_config={}, step=0)
    fixed, moving = read_image(pair2d / "fixed.nii.gz"), read_image(pair2d / "moving.nii.gz")
    a = medreg.predict(ckpt, fixed, moving, regularisation=0.01).transform.displacement(fixed.grid)
    b = medreg.predict(ckpt, fixed, moving, regularisation=10.0).transform.displacement(fixed.grid)
    assert (a - b).abs().max() > 1e-3


def test_bundled_brain3d_raises_dice_on_the_bundled_brains():
    """The shipped brain3d weights, end to end on the bundled Colin27 → MNI152 pair (2 mm, AAL):
    Dice 0.681 → 0.802, no folding. Both brains were among its six training subjects, so this
    guards the shipped file and the prediction path; generalisation is measured on the unseen vxm
    pair by benchmarks/bench_register.py (RESULTS.md)."""
    res = medreg.predict("brain3d", BUNDLED / "mni152_t1_2mm.nii.gz", BUNDLED / "colin27_t1_2mm.nii.gz",
                         fixed_labels=BUNDLED / "mni152_aal_2mm.nii.gz",
                         moving_labels=BUNDLED / "colin27_aal_2mm.nii.gz", threads=2)
    assert res.metrics["dice_after"] > res.metrics["dice_before"] + 0.07, res.metrics
    assert res.metrics["displacement"]["folding_percent"] == 0


def _stored_flipped_x(img: Image) -> Image:
    """The same image in the same world place, its x axis stored the other way round."""
    g = img.grid
    d = np.asarray(g.direction, dtype=float).copy()
    origin = np.asarray(g.origin, dtype=float) + d[:, 0] * g.spacing[0] * (g.size[0] - 1)
    d[:, 0] *= -1
    return Image(img.data.flip(-1), Grid(g.size, g.spacing, origin.tolist(), d), img.name)


@pytest.mark.data
def test_bundled_hippocampus_model_sees_crops_the_same_way_up(shared_data):
    """How a file is stored must not change what the model predicts: the bundled crop model puts
    every fixed image on an RAS grid (its training crops' orientation), so a crop stored LAS gives
    the same Dice as the same crop stored RAS (before, 0.64 → 0.40 on a held-out pair)."""
    d = shared_data / "msd-hippocampus"
    f, m = read_image(d / "images" / "hippocampus_243.nii.gz"), read_image(d / "images" / "hippocampus_338.nii.gz")
    fl = read_image(d / "labels" / "hippocampus_243.nii.gz", label=True)
    ml = read_image(d / "labels" / "hippocampus_338.nii.gz", label=True)
    stored = medreg.predict("hippocampus", f, m, fixed_labels=fl, moving_labels=ml, threads=1)
    flipped = medreg.predict("hippocampus", _stored_flipped_x(f), m, fixed_labels=_stored_flipped_x(fl),
                             moving_labels=ml, threads=1)
    assert stored.metrics["dice_after"] > stored.metrics["dice_before"] + 0.1, stored.metrics
    assert abs(flipped.metrics["dice_after"] - stored.metrics["dice_after"]) < 1e-6
    assert torch.equal(flipped.warped_labels.data.flip(-1), stored.warped_labels.data)


def test_the_field_of_view_warning_measures_along_the_models_axes():
    """A 30×100×30 mm crop (R, A, S) stored with its first index axis along A: the RAS model grid
    (40×56×40 mm) sees 100/56 < 2 of it along A, so no warning, whatever the storage order."""
    import warnings

    from medreg.train.predict import _warn_field_of_view

    prep = load_checkpoint("hippocampus").preprocess
    ars = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # i → A, j → R (LPS world)
    for size, direction in (((30, 100, 30), np.diag([-1.0, -1.0, 1.0])), ((100, 30, 30), ars)):
        fixed = Image(torch.zeros(size[::-1]), Grid(size, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction), "crop")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _warn_field_of_view(fixed, network_grid(fixed.grid, prep))


def test_a_model_given_an_image_far_larger_than_its_grid_warns():
    """The hippocampus crop model on a whole brain sees 40×56×40 mm of it: a warning says so."""
    with pytest.warns(UserWarning, match=r"the model sees 40×56×40 mm .* but the image spans 182×218×182 mm"):
        medreg.predict("hippocampus", BUNDLED / "mni152_t1_2mm.nii.gz", BUNDLED / "colin27_t1_2mm.nii.gz",
                       threads=1)


def test_bundled_brain2d_model_sees_slices_the_same_way_up():
    """The bundled 2D model puts every slice on its training orientation (LA), so the same slice
    stored with x reversed gives the same registration (bundled Colin27 → MNI152 axial slices)."""
    fixed3d, moving3d = read_image(BUNDLED / "mni152_t1_2mm.nii.gz"), read_image(BUNDLED / "colin27_t1_2mm.nii.gz")

    def axial(img: Image) -> Image:  # the middle axial slice as a 2D LA image, 2 mm
        k = img.grid.size[2] // 2
        g = Grid(img.grid.size[:2], (2.0, 2.0), (0.0, 0.0), np.array([[1.0, 0.0], [0.0, -1.0]]))
        data = img.data[:, k].float()
        if img.grid.direction[0, 0] < 0:  # stored R→L: make x run to the left as LA says
            data = data.flip(-1)
        if img.grid.direction[1, 1] > 0:  # stored P→A in LPS y: make y run anterior
            data = data.flip(-2)
        return Image(data, g, img.name)

    f, m = axial(fixed3d), axial(moving3d)
    stored = medreg.predict("brain2d", f, m, threads=1)
    flipped = medreg.predict("brain2d", _stored_flipped_x(f), m, threads=1)
    a, b = stored.warped.data, flipped.warped.data.flip(-1)
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
