"""cryoem real formats (io) and picking real micrograph files (pick); every fixture is written here, into tmp_path."""
import mrcfile
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from project_lib.cryoem.io import (bin_image, cryoppp_mrc_to_jpg_frame, flip_y, fourier_resample, read_coordinates,
                                   read_micrograph, read_star_picks, to_model_grid, write_mrc, write_picks)
from project_lib.cryoem.pick import pick_micrograph_file, predict_probability

RELION31 = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographPixelSize #3
_rlnImageSize #4
opticsGroup1 1 1.06 256

# version 30001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnMicrographName #3
_rlnOpticsGroup #4
_rlnAutopickFigureOfMerit #5
1021.5 310.0 Micrographs/FoilHole_1_Data_2.mrc 1 0.9
88.0 1500.25 Micrographs/FoilHole_3_Data_4.mrc 1 0.8
412.0 77.0 Micrographs/FoilHole_1_Data_2.mrc 1 0.7
"""


# --- micrographs ---------------------------------------------------------------------------------------------------

def test_micrograph_orientation_x_is_column_y_is_row(tmp_path):
    img = np.zeros((30, 50), np.uint8)
    img[5, 40] = 255
    Image.fromarray(img).save(tmp_path / "m.png")
    pd.DataFrame({"X-Coordinate": [40], "Y-Coordinate": [5], "Diameter": [4]}).to_csv(tmp_path / "m.csv", index=False)
    data, pixel = read_micrograph(tmp_path / "m.png")
    coords = read_coordinates(tmp_path / "m.csv", data.shape)
    assert pixel is None and data[int(coords.y[0]), int(coords.x[0])] == 255


def test_mrc_round_trip_keeps_pixel_size(tmp_path):
    write_mrc(tmp_path / "a.mrc", np.arange(12, dtype=np.float32).reshape(3, 4), 4.25)
    data, pixel = read_micrograph(tmp_path / "a.mrc")
    assert pixel == pytest.approx(4.25) and data[2, 3] == 11


def test_float64_tiff_and_16_bit_png_come_back_float32(tmp_path):
    values = np.linspace(-1e5, 1e5, 35 * 21).reshape(35, 21)               # float64, beyond float16 and uint8 ranges
    tifffile.imwrite(tmp_path / "m.tiff", values)
    data, pixel = read_micrograph(tmp_path / "m.tiff")
    assert data.dtype == np.float32 and pixel is None
    np.testing.assert_allclose(data, values, rtol=1e-6)
    Image.fromarray(np.full((4, 6), 40000, np.uint16)).save(tmp_path / "deep.png")
    data, _ = read_micrograph(tmp_path / "deep.png")
    assert data.dtype == np.float32 and data.shape == (4, 6) and float(data[0, 0]) == 40000.0


@pytest.mark.parametrize("name, writer, message", [
    ("stack.mrc", lambda p: mrcfile.new(p, np.zeros((2, 4, 4), np.float32)).close(), "must be 2-D"),
    ("junk.mrc", lambda p: p.write_bytes(b"MRC?" * 10), "not a valid MRC"),
    ("fft.mrc", lambda p: mrcfile.new(p, np.ones((4, 4), np.complex64)).close(), "complex"),
    ("nan.mrc", lambda p: mrcfile.new(p, np.array([[0, np.nan], [np.inf, 1]], np.float32)).close(), "2 NaN or infinite"),
    ("fft.tif", lambda p: tifffile.imwrite(p, np.ones((4, 4), np.complex128)), "complex"),
    ("huge.tif", lambda p: tifffile.imwrite(p, np.full((4, 4), 1e300)), "beyond the float32 range"),
    ("junk.tif", lambda p: p.write_bytes(b"not a tiff at all"), "not a readable TIFF"),
    ("cut.tif", lambda p: p.write_bytes(b"II*\x00garbage"), "must be 2-D"),
    ("junk.png", lambda p: p.write_bytes(b"not a png"), "not a readable image"),
    ("m.dm4", lambda p: p.write_bytes(b"\x00"), "unsupported format"),
])
@pytest.mark.filterwarnings("ignore:Data array contains NaN")                   # mrcfile warns while writing the fixture
def test_bad_micrographs_are_refused_with_the_file_name(tmp_path, name, writer, message):
    path = tmp_path / name
    writer(path)
    with pytest.raises(ValueError, match=message) as err:
        read_micrograph(path)
    assert name in str(err.value)


def test_missing_micrograph(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_micrograph(tmp_path / "none.mrc")


# --- coordinates ---------------------------------------------------------------------------------------------------

def test_bad_coordinates(tmp_path):
    pd.DataFrame({"X-Coordinate": [10, 70], "Y-Coordinate": [5, 5], "Diameter": [4, 4]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="1 particle"):
        read_coordinates(tmp_path / "c.csv", (30, 50))
    pd.DataFrame({"X-Coordinate": [10], "Y-Coordinate": [5]}).to_csv(tmp_path / "nod.csv", index=False)
    with pytest.raises(ValueError, match="Diameter"):
        read_coordinates(tmp_path / "nod.csv")
    write_picks(pd.DataFrame({"x": [1.0], "y": [2.0], "score": [0.5]}), tmp_path / "p.star")
    with pytest.raises(ValueError, match="diameter_px"):
        read_coordinates(tmp_path / "p.star")
    (tmp_path / "c.box").write_text("10 5 4 4\n")
    with pytest.raises(ValueError, match="unsupported format"):
        read_coordinates(tmp_path / "c.box")


@pytest.mark.parametrize("name, text, message", [
    ("FoilHole_7.csv", "", "cannot be parsed"),                                                    # empty file
    ("FoilHole_7.csv", 'X-Coordinate,Y-Coordinate\n1,2\n"3,4\n', "cannot be parsed"),             # unterminated quote
    ("FoilHole_7.csv", "X-Coordinate,Y-Coordinate,Diameter\nten,5,4\n", "non-numeric"),
    ("FoilHole_7.csv", "X-Coordinate,Y-Coordinate,Diameter\n1,,4\n", "missing, non-finite"),
    ("FoilHole_7.csv", "X-Coordinate,Y-Coordinate,Diameter\n1,2,0\n", "non-positive"),
    ("FoilHole_7.csv", "x,y\n1,2\n", "needs X-Coordinate and Y-Coordinate"),
    ("bad_picks.star", "data_optics\n\nloop_\n_rlnOpticsGroup #1\n1\n", "no block with rlnCoordinateX"),
    ("bad_picks.star", "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 2 3\n4\n", "cannot be parsed"),
    ("bad_picks.star", "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_pickDiameterPx #3\n1 2 wide\n", "non-numeric"),
])
def test_bad_coordinate_files_are_refused_naming_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_coordinates(path)
    assert name in str(err.value)


def test_relion_31_star_reads_the_particles_block_not_the_optics_block(tmp_path):
    (tmp_path / "particles.star").write_text(RELION31)
    tables = read_star_picks(tmp_path / "particles.star", diameter_px=50)
    assert list(tables) == ["Micrographs/FoilHole_1_Data_2.mrc", "Micrographs/FoilHole_3_Data_4.mrc"]
    first = tables["Micrographs/FoilHole_1_Data_2.mrc"]
    assert first[["x", "y"]].to_numpy().tolist() == [[1021.5, 310.0], [412.0, 77.0]]
    assert tables["Micrographs/FoilHole_3_Data_4.mrc"][["x", "y"]].to_numpy().tolist() == [[88.0, 1500.25]]
    assert first.diameter.tolist() == [50.0, 50.0]


def test_star_with_several_micrographs_is_split_not_merged(tmp_path):
    (tmp_path / "particles.star").write_text(RELION31)
    with pytest.raises(ValueError, match="covers 2 micrographs"):
        read_coordinates(tmp_path / "particles.star", diameter_px=50)
    one = read_coordinates(tmp_path / "particles.star", (2000, 2000), 50, micrograph="FoilHole_3_Data_4.mrc")
    assert one[["x", "y"]].to_numpy().tolist() == [[88.0, 1500.25]]
    same = read_coordinates(tmp_path / "particles.star", diameter_px=50, micrograph="Micrographs/FoilHole_3_Data_4.mrc")
    pd.testing.assert_frame_equal(one, same)
    with pytest.raises(ValueError, match="no particles of micrograph 'FoilHole_9.mrc'"):
        read_coordinates(tmp_path / "particles.star", diameter_px=50, micrograph="FoilHole_9.mrc")
    write_picks(pd.DataFrame({"x": [1.0], "y": [2.0], "score": [1.0], "diameter": [3.0]}), tmp_path / "c.csv")
    with pytest.raises(ValueError, match="one micrograph"):
        read_coordinates(tmp_path / "c.csv", micrograph="c")


def test_relion_30_star_without_micrograph_names(tmp_path):
    (tmp_path / "mic_autopick.star").write_text("\ndata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n10 20\n30 40\n")
    assert list(read_star_picks(tmp_path / "mic_autopick.star", 8)) == [""]
    assert read_coordinates(tmp_path / "mic_autopick.star", diameter_px=8).to_numpy().tolist() == [[10, 20, 8], [30, 40, 8]]


@pytest.mark.parametrize("suffix", [".star", ".csv"])
def test_exported_picks_keep_their_diameter(tmp_path, suffix):
    picks = pd.DataFrame({"x": [12.5, 300.0], "y": [40.0, 7.25], "score": [0.91, 0.42], "diameter": [22.0, 31.5]})
    path = write_picks(picks, tmp_path / f"picks{suffix}", micrograph_name="mic.mrc")
    back = read_coordinates(path)                                          # no diameter_px: it comes from the file
    assert back.to_numpy().tolist() == [[12.5, 40.0, 22.0], [300.0, 7.25, 31.5]]
    if suffix == ".star":
        assert "_pickDiameterPx" in path.read_text() and "_rlnAutopickFigureOfMerit" in path.read_text()
        assert list(read_star_picks(path)) == ["mic.mrc"]


# --- CryoPPP's MRC and JPG frames ----------------------------------------------------------------------------------

def _l_shape(shape, corner, up):
    "An L whose bright corner (value 9) is at `corner` (row, col), one arm to the right, the other `up` rows (-1) or down (+1)."
    img = np.zeros(shape, np.float32)
    r, c = corner
    img[r, c:c + 4] = 1
    rows = range(r, r - 4, -1) if up < 0 else range(r, r + 4)
    img[list(rows), c] = 1
    img[r, c] = 9
    return img


def test_cryoppp_jpg_frame_is_the_mrc_flipped_top_to_bottom(tmp_path):
    # drawn by hand in each frame: in the JPG (as displayed) the L stands upright, its corner at row 9, column 3 of
    # an 11 x 7 image; the MRC stores rows bottom first, so there the corner is at row 11 - 1 - 9 = 1, arm going down
    mrc, jpg = _l_shape((11, 7), (1, 3), up=+1), _l_shape((11, 7), (9, 3), up=-1)
    write_mrc(tmp_path / "mic.mrc", mrc, 1.0)
    Image.fromarray((jpg * 28).astype(np.uint8)).save(tmp_path / "mic.png")      # lossless stand-in for the JPG
    pd.DataFrame({"X-Coordinate": [3], "Y-Coordinate": [9], "Diameter": [4]}).to_csv(tmp_path / "mic.csv", index=False)
    mrc_read, _ = read_micrograph(tmp_path / "mic.mrc")
    jpg_read, _ = read_micrograph(tmp_path / "mic.png")
    np.testing.assert_array_equal(cryoppp_mrc_to_jpg_frame(mrc_read) * 28, jpg_read)
    corner = read_coordinates(tmp_path / "mic.csv", jpg_read.shape)           # CryoPPP coordinates: JPG frame
    assert jpg_read[int(corner.y[0]), int(corner.x[0])] == 9 * 28
    in_mrc = flip_y(corner, mrc_read.shape[0])
    assert (in_mrc.x[0], in_mrc.y[0]) == (3, 1) and mrc_read[1, 3] == 9
    # CryoSegNet's own expression, applied to the array, is the same flip
    np.testing.assert_array_equal(np.rot90(mrc_read.T), jpg_read / 28)


# --- resampling ----------------------------------------------------------------------------------------------------

def test_binning_and_fourier_resampling_hand_cases():
    assert bin_image(np.arange(16.0).reshape(4, 4), 2).tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert bin_image(np.ones((5, 7)), 2).shape == (2, 3)                        # edges that do not fill a block are cropped
    r, c = np.indices((50, 36))
    fine = np.cos(2 * np.pi * 4 * r / 50) * np.cos(2 * np.pi * 3 * c / 36)
    r2, c2 = np.indices((35, 24))
    np.testing.assert_allclose(fourier_resample(fine, (35, 24)), np.cos(2 * np.pi * 4 * r2 / 35) * np.cos(2 * np.pi * 3 * c2 / 24), atol=1e-10)
    np.testing.assert_allclose(fourier_resample(np.full((9, 8), 2.5), (5, 3)), 2.5)


# --- picking a real micrograph file --------------------------------------------------------------------------------

class BrightSpots(nn.Module):
    "Stub picker: particle logits rise with the normalised intensity."
    def forward(self, x):
        return 3 * x - 3


TRUTH = np.array([[30.0, 100.0], [70.0, 44.0], [121.0, 60.0]])                 # x, y in the file's pixels, sorted by x


@pytest.fixture
def blobs_mrc(tmp_path):
    rows, cols = np.indices((123, 151))                                         # odd sizes on purpose
    image = sum(np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * 6.0 ** 2)) for x, y in TRUTH)
    return write_mrc(tmp_path / "blobs.mrc", image, 1.25)


@pytest.mark.parametrize("model_pixel_size_a, working_shape", [
    (1.25, (123, 151)), (2.5, (61, 75)),                                        # binning by 1 and 2
    (1.875, (82, 101)), (3.0, (51, 63)),                                        # Fourier resampling by 1.5 and 2.4
])
def test_picks_come_back_in_the_original_frame(blobs_mrc, model_pixel_size_a, working_shape):
    torch.set_num_threads(1)
    picks, prob = pick_micrograph_file(blobs_mrc, BrightSpots(), model_pixel_size_a, 25.0, 0.5)
    found = picks.sort_values("x")[["x", "y"]].to_numpy()
    ratio = model_pixel_size_a / 1.25
    assert len(picks) == 3 and np.abs(found - TRUTH).max() <= ratio             # within one working pixel
    assert picks.diameter.tolist() == [20.0] * 3 and (picks.score >= 0.5).all()   # 25 Å at 1.25 Å/px
    assert prob.shape == working_shape


def test_header_pixel_size_can_be_overridden_and_picks_are_written(blobs_mrc, tmp_path):
    picks, _ = pick_micrograph_file(blobs_mrc, BrightSpots(), 2.0, 20.0, 0.5, out_path=tmp_path / "p.csv", pixel_size_a=1.0)
    assert picks.diameter.tolist() == [20.0] * 3 and np.abs(picks.sort_values("x")[["x", "y"]].to_numpy() - TRUTH).max() <= 2
    back = read_coordinates(tmp_path / "p.csv", (123, 151))
    np.testing.assert_allclose(back[["x", "y", "diameter"]].to_numpy(), picks[["x", "y", "diameter"]].to_numpy())


def test_binning_map_is_exact():
    image = np.zeros((31, 20))
    image[6:9, 12:15] = 1                                                       # a 3 x 3 block centred at x = 13, y = 7
    working, scale, offset = to_model_grid(image, 1.0, 3.0)
    (row, col), = np.argwhere(working == 1)
    assert (col * scale[0] + offset, row * scale[1] + offset) == (13.0, 7.0)


@pytest.mark.parametrize("shape", [(37, 53), (16, 16), (33, 17), (64, 48)])
def test_padding_and_unpadding_are_exact(shape):
    seen = []

    class Identity(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return x
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(predict_probability(Identity(), image), 1 / (1 + np.exp(-image)), rtol=1e-6)
    assert all(s % 16 == 0 and 0 <= s - t < 16 for s, t in zip(seen[0], shape))


def test_pick_refuses_bad_inputs(tmp_path, blobs_mrc):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match="no pixel size in its header: pass pixel_size_a"):
        pick_micrograph_file(tmp_path / "m.png", BrightSpots(), 2.0, 20.0, 0.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pick_micrograph_file(tmp_path / "none.mrc", BrightSpots(), 2.0, 20.0, 0.5)
    with pytest.raises(ValueError, match="model_pixel_size_a must be positive"):
        pick_micrograph_file(blobs_mrc, BrightSpots(), 0.0, 20.0, 0.5)
    with pytest.raises(ValueError, match="at least 16 px"):
        pick_micrograph_file(blobs_mrc, BrightSpots(), 20.0, 20.0, 0.5)
    with pytest.raises(ValueError, match="unsupported format"):
        pick_micrograph_file(blobs_mrc, BrightSpots(), 2.5, 20.0, 0.5, out_path=tmp_path / "p.box")


# --- what the checkpoint knows, and the checks it makes possible -----------------------------------------------------

class SizedBlobs(nn.Module):
    """Stub picker that finds bright blobs of one size only: logits from the scale-normalised Laplacian of Gaussian at
    sigma (working pixels), positive where the response exceeds 0.8 of that of a blob of exactly that size."""
    def __init__(self, sigma: float, reference: float):
        super().__init__()
        self.sigma, self.reference = sigma, reference
    def forward(self, x):
        from scipy import ndimage
        r = -self.sigma ** 2 * ndimage.gaussian_laplace(x[0, 0].double().numpy(), self.sigma)
        return torch.from_numpy(40 * (r / self.reference - 0.8)).float()[None, None]


def _blob_field(centres, sigma, shape=(160, 160)):
    rows, cols = np.indices(shape)
    return sum(np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma ** 2)) for x, y in centres)


@pytest.fixture
def sized(tmp_path):
    "Twelve bright blobs of sigma 4 px in a 2.0 Å/px micrograph, and a stub picker tuned to them at 2.0 Å/px."
    centres = [(20 + 40 * (k % 4), 20 + 40 * (k // 4)) for k in range(12)]
    image = _blob_field(centres, 4.0)
    normalised = (image - image.mean()) / image.std()
    reference = float((-16 * ndimage_laplace(normalised, 4.0)).max())
    return write_mrc(tmp_path / "sized.mrc", image, 2.0), image, SizedBlobs(4.0, reference), np.array(centres, float)


def ndimage_laplace(image, sigma):
    from scipy import ndimage
    return ndimage.gaussian_laplace(image, sigma)


def test_the_stub_finds_the_blobs_at_the_true_pixel_size(sized):
    path, _, model, centres = sized
    picks, _ = pick_micrograph_file(path, model, 2.0, 19.0, 0.5)
    assert len(picks) == 12 and np.abs(np.sort(picks.x.to_numpy()) - np.sort(centres[:, 0])).max() <= 1


def test_an_inverted_micrograph_is_refused_or_picked_as_the_original(sized, tmp_path):
    path, image, model, _ = sized
    inverted = write_mrc(tmp_path / "inverted.mrc", -image, 2.0)
    with pytest.raises(ValueError, match=r"looks contrast-inverted.*0 picks as given, 12 with the contrast inverted.*invert=True"):
        pick_micrograph_file(inverted, model, 2.0, 19.0, 0.5)
    same, _ = pick_micrograph_file(inverted, model, 2.0, 19.0, 0.5, invert=True)
    original, _ = pick_micrograph_file(path, model, 2.0, 19.0, 0.5)
    pd.testing.assert_frame_equal(same, original)
    assert len(pick_micrograph_file(inverted, model, 2.0, 19.0, 0.5, invert=False)[0]) == 0   # no check asked for: as given


def test_a_pixel_size_that_makes_the_particles_implausible_is_refused_naming_it(sized, tmp_path):
    _, image, model, _ = sized
    wrong = write_mrc(tmp_path / "wrong_header.mrc", image, 1.0)                  # the header halves the true 2.0 Å/px
    with pytest.raises(ValueError, match=r"the header's pixel size 1 Å makes the particles .* implausible.*0 picks at 1 Å/px but 12 at 1.41 Å/px"):
        pick_micrograph_file(wrong, model, 2.0, 19.0, 0.5)
    with pytest.raises(ValueError, match=r"pixel_size_a 4 Å makes the particles"):
        pick_micrograph_file(wrong, model, 2.0, 19.0, 0.5, pixel_size_a=4.0)
    assert len(pick_micrograph_file(wrong, model, 2.0, 19.0, 0.5, pixel_size_a=2.0)[0]) == 12   # the true pixel size, given: accepted


def test_edge_picks_can_be_excluded(tmp_path):
    rows, cols = np.indices((123, 151))
    image = sum(np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * 6.0 ** 2)) for x, y in [(60.0, 60.0), (4.0, 60.0)])   # one 4 px from the border
    path = write_mrc(tmp_path / "edge.mrc", image, 1.0)
    picks, _ = pick_micrograph_file(path, BrightSpots(), 1.0, 20.0, 0.5)
    kept, _ = pick_micrograph_file(path, BrightSpots(), 1.0, 20.0, 0.5, exclude_edge=True)
    assert len(picks) == 2 and len(kept) == 1 and abs(kept.x[0] - 60) <= 1


def test_a_checkpoint_carries_its_picking_metadata(sized, tmp_path):
    from project_lib.cryoem.pick import load_picker
    from project_lib.cryoem.train import TrainConfig, add_picking_metadata, build_model
    from project_lib.engine import save_checkpoint
    config = TrainConfig(width=0.0625, seed=0)
    net = build_model(config)
    save_checkpoint(tmp_path / "best.pt", {"model": net.state_dict(), "epoch": 1, "metrics": {}})
    with pytest.raises(ValueError, match="carries no picking and config"):
        load_picker(tmp_path / "best.pt")
    picking = {"pixel_size_a": 2.0, "diameter_a": 19.0, "threshold": 0.5, "polarity": "dark", "polarity_contrast": -0.3}
    add_picking_metadata(tmp_path / "best.pt", picking, config)
    model, meta = load_picker(tmp_path / "best.pt")
    assert meta == picking and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))
    path, *_ = sized
    from_file, _ = pick_micrograph_file(path, tmp_path / "best.pt", check_pixel_size=False, invert=False)
    given, _ = pick_micrograph_file(path, model, 2.0, 19.0, 0.5, check_pixel_size=False, invert=False)
    pd.testing.assert_frame_equal(from_file, given)
    with pytest.raises(ValueError, match="model_pixel_size_a, diameter_a, threshold must be given with a network"):
        pick_micrograph_file(path, model)
