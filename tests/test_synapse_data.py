"""synapse.data: generator determinism and ground truth, class/bbox design, original layout round trip, cube preparation."""
import numpy as np
import pandas as pd
import pytest
import tifffile

from project_lib.synapse.data import (mask_thickness, CLASS_NAMES, ORIGINAL_MASK_LABELS, POST, PRE, SEGMENTATION_TYPES, SEMANTIC_LABELS,
                                      SYNAPSE_TABLE_COLUMNS, GeneratorConfig, SynapseCube, SyntheticSynapses, assemble_bbox,
                                      blend_outside_mask, check_mask_labels, crop_cube, cubes_from_bbox, generate_cube, load_bbox,
                                      normalise_cube, original_mask_labels, prepare_cube, read_synapse_table, read_tiff_stack,
                                      segmentation_mask, write_original_layout)

TINY = GeneratorConfig(cube_size=16, voxel_nm=40.0, n_bboxes=2, axons_per_bbox=3, synapses_per_axon=2, n_classes=3)
SMALL = GeneratorConfig(cube_size=32, voxel_nm=20.0, n_classes=5)
QUIET = {"contrast": 1.0, "offset": 0.0, "noise_sigma": 0.0, "blur_nm": 0.0}


def at(volume, meta, point):
    """Value of a [z, y, x] volume at an (x, y, z) annotation point of the metadata."""
    return volume[meta[f"{point}_coord_3"], meta[f"{point}_coord_2"], meta[f"{point}_coord_1"]]


# ---------------------------------------------------------------- generator

def test_same_seed_same_cubes_in_any_order():
    a, b = SyntheticSynapses(TINY, seed=7), SyntheticSynapses(TINY, seed=7)
    late_first = b[len(b) - 1]
    for i in (0, 5, len(a) - 1):
        x, y = a[i], b[i]
        for name in ("raw", "instance", "semantic"):
            assert np.array_equal(getattr(x, name), getattr(y, name))
        assert x.metadata == y.metadata
    assert np.array_equal(a[len(a) - 1].raw, late_first.raw)
    assert np.array_equal(a[3].raw, a[3].raw)                 # asking twice
    assert not np.array_equal(SyntheticSynapses(TINY, seed=8)[0].raw, a[0].raw)


def test_metadata_table_equals_the_cubes_metadata():
    ds = SyntheticSynapses(TINY, seed=1)
    table = ds.metadata()
    assert len(table) == len(ds) == TINY.n_cubes == 12
    for i in range(len(ds)):
        assert ds[i].metadata == table.iloc[i].to_dict()
    assert table.synapse_id.is_unique and table.synapse_id[0] == "bbox0_axon0_syn0"


def test_shapes_dtypes_and_range():
    cube = generate_cube(SMALL, 2, np.random.default_rng(0))
    assert cube.raw.shape == cube.instance.shape == cube.semantic.shape == (32, 32, 32)
    assert (cube.raw.dtype, cube.instance.dtype, cube.semantic.dtype) == (np.float32, np.int32, np.uint8)
    assert 0.0 <= cube.raw.min() and cube.raw.max() <= 1.0 and cube.raw.std() > 0.05
    assert set(np.unique(cube.semantic)) <= {0, *SEMANTIC_LABELS.values()}
    assert cube.instance.min() >= 0 and set(np.unique(cube.instance)) >= {0, PRE, POST}
    assert cube.metadata["class_name"] == CLASS_NAMES[2]


def test_class_is_independent_of_bbox_and_shared_by_an_axon():
    table = SyntheticSynapses(GeneratorConfig(n_bboxes=5, axons_per_bbox=8, synapses_per_axon=2, n_classes=4), seed=0).metadata()
    counts = pd.crosstab(table.bbox, table.synapse_class)
    assert counts.shape == (5, 4) and (counts.to_numpy() == 4).all()     # every bbox holds every class equally
    assert (table.groupby("axon").synapse_class.nunique() == 1).all()
    assert (table.groupby("axon").bbox.nunique() == 1).all() and table.axon.nunique() == 40
    # nuisances belong to the bbox, not to the class
    assert (table.groupby("bbox").contrast.nunique() == 1).all()
    assert table.groupby("synapse_class").contrast.mean().std() < 0.05


def test_separation_zero_makes_classes_identical_in_distribution():
    def psd_means(separation):
        cfg = GeneratorConfig(n_bboxes=10, axons_per_bbox=8, synapses_per_axon=4, n_classes=4, separation=separation)
        return SyntheticSynapses(cfg, seed=2).metadata().groupby("synapse_class").psd_thickness_nm.mean()
    same, apart = psd_means(0.0), psd_means(1.0)
    assert same.max() - same.min() < 4.0                      # within-class sd 5 nm, 80 synapses per class
    assert apart.max() - apart.min() > 25.0                   # class means 50, 12, 35, 30 nm
    assert abs(apart[0] - 50) < 4 and abs(apart[1] - 12) < 4


def test_axon_offset_and_nuisance_reach_the_cube():
    plain = generate_cube(SMALL, 0, np.random.default_rng(3), QUIET).metadata
    shifted = generate_cube(SMALL, 0, np.random.default_rng(3), QUIET, {"psd_thickness_nm": 10.0}).metadata
    assert shifted["psd_thickness_nm"] == pytest.approx(plain["psd_thickness_nm"] + 10.0)
    assert {k: shifted[k] for k in QUIET} == QUIET
    with pytest.raises(ValueError, match="unknown traits"):
        generate_cube(SMALL, 0, np.random.default_rng(0), None, {"psd": 1.0})
    with pytest.raises(ValueError, match="nuisance must be a dict"):
        generate_cube(SMALL, 0, np.random.default_rng(0), {"contrast": 1.0})
    with pytest.raises(ValueError, match="synapse_class"):
        generate_cube(SMALL, 5, np.random.default_rng(0))


@pytest.mark.parametrize("synapse_class", range(5))
def test_ground_truth_sits_in_the_right_neurite(synapse_class):
    cube = generate_cube(SMALL, synapse_class, np.random.default_rng(10 + synapse_class))
    m, inst, sem = cube.metadata, cube.instance, cube.semantic
    assert at(inst, m, "side_1") == PRE and at(inst, m, "side_2") == POST
    assert at(sem, m, "central") == SEMANTIC_LABELS["cleft"]
    cloud = sem == SEMANTIC_LABELS["vesicle_cloud"]
    assert cloud.sum() > 100 and (inst[cloud] == PRE).all()
    assert set(np.unique(inst[sem == SEMANTIC_LABELS["cleft"]])) <= {0, PRE, POST}
    mito = sem == SEMANTIC_LABELS["mitochondrion"]
    assert set(np.unique(inst[mito])) <= {PRE, POST}
    assert mito.any() or not m["mitochondrion"]


def test_psd_thickness_shows_in_the_image():
    # without noise or blur, dark voxels just under the cleft on the postsynaptic side measure the PSD
    def dark_psd_voxels(synapse_class):
        cube = generate_cube(GeneratorConfig(cube_size=64, voxel_nm=10.0, rotate=False, jitter_nm=0.0), synapse_class,
                             np.random.default_rng(4), QUIET)
        c = cube.metadata["central_coord_3"]
        below = cube.raw[c - 8:c - 1][cube.instance[c - 8:c - 1] == POST]
        return (below < 0.3).sum(), cube.metadata["psd_thickness_nm"]
    thick, thick_nm = dark_psd_voxels(0)
    thin, thin_nm = dark_psd_voxels(1)
    assert thick_nm > 2 * thin_nm and thick > 2 * thin


def test_structures_are_defined_in_nm():
    # the same random stream at half the resolution draws the same synapse and shows the same field
    fine = generate_cube(GeneratorConfig(cube_size=64, voxel_nm=10.0, jitter_nm=0.0), 0, np.random.default_rng(5), QUIET)
    coarse = generate_cube(GeneratorConfig(cube_size=32, voxel_nm=20.0, jitter_nm=0.0), 0, np.random.default_rng(5), QUIET)
    traits = ("psd_thickness_nm", "vesicle_count", "cleft_radius_nm", "spine", "cleft_normal_3")
    assert [fine.metadata[t] for t in traits] == [coarse.metadata[t] for t in traits]
    assert np.mean(fine.instance == PRE) == pytest.approx(np.mean(coarse.instance == PRE), rel=0.05)


def _centred_block_mean(fine, f):
    "Block means of a fine render, block k centred on coarse voxel k (odd f): fine voxels f*k - (f-1)/2 .. f*k + (f-1)/2."
    s, h = fine.shape[0] // f, (f - 1) // 2
    return np.roll(fine, (h, h, h), axis=(0, 1, 2)).reshape(s, f, s, f, s, f).mean(axis=(1, 3, 5))


@pytest.mark.parametrize("synapse_class,organelles", [(0, False), (2, False), (0, True)])
def test_a_coarse_render_is_the_block_average_of_a_fine_one(synapse_class, organelles):
    """The cpu profile's 32^3 at 20 nm against a 160^3 render at 4 nm of the same synapse, block-averaged by 5 (an independent
    render at a resolution no coarse cube uses): r > 0.95 away from the border (the first round's direct render: 0.67-0.69);
    with the surrounding neurites' mitochondria too (drawn from the cube's stream, not from its grid: the same at every resolution)."""
    nuisance = {"contrast": 1.0, "offset": 0.0, "noise_sigma": 0.0, "blur_nm": 6.0}
    coarse, fine = (generate_cube(GeneratorConfig(cube_size=s, voxel_nm=v, jitter_nm=0.0, neuropil_organelles=organelles), synapse_class,
                                  np.random.default_rng(3), nuisance).raw
                    for s, v in ((32, 20.0), (160, 4.0)))
    inner = (slice(1, 31),) * 3
    r = np.corrcoef(coarse[inner].ravel(), _centred_block_mean(fine, 5)[inner].ravel())[0, 1]
    assert r > 0.95, r


def test_noise_is_scaled_to_the_voxel_volume():
    """noise_sigma is the noise of an 8 nm voxel: a 20 nm voxel averages (20/8)^3 of them, so its noise sd is sigma * (8/20)^1.5."""
    quiet = {"contrast": 1.0, "offset": 0.0, "noise_sigma": 0.0, "blur_nm": 6.0}
    for size, voxel in ((32, 20.0), (40, 16.0), (80, 8.0)):
        config = GeneratorConfig(cube_size=size, voxel_nm=voxel, jitter_nm=0.0)
        clean, noisy = (generate_cube(config, 1, np.random.default_rng(5), {**quiet, "noise_sigma": s}).raw for s in (0.0, 0.05))
        inside = (clean > 0.2) & (clean < 0.8)          # away from the clip at 0 and 1
        assert np.std((noisy - clean)[inside]) == pytest.approx(0.05 * (8.0 / voxel) ** 1.5, rel=0.05)


def test_masks_are_block_modes_of_the_fine_masks():
    """Semantic and instance masks of a supersampled cube are the most frequent label of each block of the fine render."""
    from project_lib.synapse.data import block_mode, supersampling
    assert [supersampling(v) for v in (8.0, 10.0, 16.0, 20.0, 40.0)] == [1, 1, 2, 2, 4]
    labels = np.zeros((4, 4, 4), np.int32)
    labels[:2, :2, :2] = [[[1, 1], [1, 2]], [[2, 2], [3, 1]]]   # block 0: four 1s, three 2s, one 3
    labels[2:, 2:, 2:] = 5
    out = block_mode(labels, 2)
    assert out.shape == (2, 2, 2) and out[0, 0, 0] == 1 and out[1, 1, 1] == 5 and out[0, 1, 0] == 0


def test_cue_controls_separate_only_their_traits():
    """class_traits='texture': classes differ in the texture traits only, every geometry trait sits at the classes' mean; and the reverse."""
    from project_lib.synapse.data import CUE_TRAITS, _class_means
    assert not set(CUE_TRAITS["texture"]) & set(CUE_TRAITS["geometry"])
    for cue, other in (("texture", "geometry"), ("geometry", "texture")):
        means = [_class_means(GeneratorConfig(class_traits=cue), k) for k in range(4)]
        for t in CUE_TRAITS[other]: assert len({round(m[t], 9) for m in means}) == 1, (cue, t)
        for t in CUE_TRAITS[cue]: assert len({round(m[t], 9) for m in means}) > 1, (cue, t)
    meta = SyntheticSynapses(GeneratorConfig(cube_size=32, voxel_nm=20.0, class_traits="texture", n_bboxes=2), 0).metadata()
    by_class = meta.groupby("synapse_class")
    assert by_class.psd_thickness_nm.mean().max() - by_class.psd_thickness_nm.mean().min() > 20       # 12 vs 50 nm apart
    with pytest.raises(ValueError, match="class_traits"): GeneratorConfig(class_traits="colour")


def _lag1(v, axis):
    a, b = np.moveaxis(v, axis, 0)[1:].ravel(), np.moveaxis(v, axis, 0)[:-1].ravel()
    return np.corrcoef(a, b)[0, 1]


def test_thick_sections_blur_z_only():
    """Sections 60 nm thick at 20 nm voxels: neighbouring z-sections become more alike than neighbouring x columns; isotropic: alike."""
    quiet = {"contrast": 1.0, "offset": 0.0, "noise_sigma": 0.0, "blur_nm": 4.0}
    iso, thick = (generate_cube(GeneratorConfig(cube_size=32, voxel_nm=20.0, section_nm=s), 0, np.random.default_rng(2), quiet).raw for s in (0.0, 60.0))
    assert abs(_lag1(iso, 0) - _lag1(iso, 2)) < 0.05
    assert _lag1(thick, 0) > _lag1(thick, 2) + 0.08                # measured 0.89 against 0.76
    assert _lag1(thick, 0) > _lag1(iso, 0) + 0.15                  # measured 0.89 against 0.68


def test_section_artefacts_change_whole_sections():
    """Gain and offset per z-section; a lost section repeats its neighbour; a shifted one is its own section rolled by one voxel."""
    from project_lib.synapse import data
    ramp = np.tile(np.arange(16, dtype=np.float32)[None, None, :], (40, 16, 1)) / 16 + 0.1
    out = data._section_artefacts(ramp.copy(), np.random.default_rng(0))
    assert np.ptp(out.mean(axis=(1, 2))) > 0                      # sections differ
    affine = [z for z in range(40) if np.corrcoef(out[z].ravel(), ramp[z].ravel())[0, 1] > 0.9999]
    copies = [z for z in range(1, 40) if np.array_equal(out[z], out[z - 1])]
    assert len(affine) >= 30 and len(affine) + len(copies) + 5 >= 40   # most sections: an affine change of their own; some lost or shifted
    with pytest.raises(ValueError, match="section_nm"): GeneratorConfig(section_nm=-1.0)


def test_bad_configs_and_inputs():
    for kwargs, message in [({"cube_size": 36}, "multiple of 8"), ({"cube_size": 8}, "multiple of 8"),
                            ({"voxel_nm": 0}, "voxel_nm"), ({"n_classes": 2}, "n_classes"),
                            ({"separation": float("nan")}, "separation"), ({"n_bboxes": 0}, "n_bboxes"),
                            ({"synapses_per_axon": 1.5}, "synapses_per_axon"), ({"jitter_nm": 500.0}, "field of view"),
                            ({"rotate": 1}, "rotate")]:
        with pytest.raises(ValueError, match=message):
            GeneratorConfig(**kwargs)
    with pytest.raises(ValueError, match="seed"):
        SyntheticSynapses(TINY, seed=-1)
    with pytest.raises(IndexError):
        SyntheticSynapses(TINY, seed=0)[TINY.n_cubes]
    with pytest.raises(TypeError, match="rng"):
        generate_cube(TINY, 0, 0)


# ---------------------------------------------------------------- original layout

@pytest.fixture(scope="module")
def tiles():
    return [SyntheticSynapses(GeneratorConfig(cube_size=16, voxel_nm=40.0, n_bboxes=1, axons_per_bbox=3, synapses_per_axon=1,
                                              n_classes=3, jitter_nm=0.0), seed=4)[i] for i in range(3)]


def test_layout_round_trip_with_coordinates(tmp_path, tiles):
    raw, seg, mask, table = assemble_bbox(tiles)
    assert raw.shape == (16, 16, 48) and list(table.columns) == list(SYNAPSE_TABLE_COLUMNS)
    write_original_layout(tmp_path, "bbox1", raw, seg, mask, table)
    assert sorted(p.name for p in (tmp_path / "raw" / "bbox1").iterdir())[:2] == ["slice_0000.tif", "slice_0001.tif"]
    raw2, seg2, mask2, table2 = load_bbox(tmp_path, "bbox1")
    assert raw2.dtype == np.uint8 and np.array_equal(raw2, np.rint(raw * 255))
    assert np.array_equal(seg2, seg) and np.array_equal(mask2, mask)
    assert table2.Var1.tolist() == [c.metadata["synapse_id"] for c in tiles]
    for i, cube in enumerate(tiles):          # coordinates (x, y, z) point at the same structures in the bbox volume
        row = table2.iloc[i]
        assert row.central_coord_1 == cube.metadata["central_coord_1"] + 16 * i
        assert seg2[row.side_1_coord_3, row.side_1_coord_2, row.side_1_coord_1] == PRE + sum(int(c.instance.max()) for c in tiles[:i])
        assert mask2[row.central_coord_3, row.central_coord_2, row.central_coord_1] == SEMANTIC_LABELS["cleft"]
    # ids of different cubes never collide
    assert len(set(np.unique(seg[:, :, :16])) & set(np.unique(seg[:, :, 16:32])) - {0}) == 0


def test_cubes_from_bbox_recover_the_generated_cubes(tmp_path, tiles):
    write_original_layout(tmp_path, "b", *assemble_bbox(tiles))
    cubes = cubes_from_bbox(tmp_path, "b", size=16)
    for cut, cube in zip(cubes, tiles):
        assert np.array_equal(cut.semantic, cube.semantic)
        assert all(np.array_equal(cut.instance == i, cube.instance == i) for i in (0, PRE, POST))
        assert np.abs(cut.raw - cube.raw).max() <= 0.5 / 255 + 1e-6
        assert at(cut.instance, cut.metadata, "side_1") == PRE


def test_rewrite_removes_stale_slices(tmp_path, tiles):
    raw, seg, mask, table = assemble_bbox(tiles)
    write_original_layout(tmp_path, "b", raw, seg, mask, table)
    write_original_layout(tmp_path, "b", raw[:10], seg[:10], mask[:10], table.assign(central_coord_3=5, side_1_coord_3=5, side_2_coord_3=5))
    assert load_bbox(tmp_path, "b")[0].shape[0] == 10


def test_read_tiff_stack_luminance_sorting_and_errors(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 200, 50
    (tmp_path / "s").mkdir()
    tifffile.imwrite(tmp_path / "s" / "slice_0001.tif", rgb)
    tifffile.imwrite(tmp_path / "s" / "slice_0000.tif", np.full((4, 5, 3), 10, np.uint8))
    stack = read_tiff_stack(tmp_path / "s")
    assert stack.shape == (2, 4, 5) and stack.dtype == np.uint8
    assert stack[0, 0, 0] == 10 and stack[1, 0, 0] == round(0.299 * 100 + 0.587 * 200 + 0.114 * 50)
    with pytest.raises(ValueError, match="2-D label image"):
        read_tiff_stack(tmp_path / "s", labels=True)
    tifffile.imwrite(tmp_path / "s" / "slice_0002.tif", np.zeros((3, 5), np.uint8))
    with pytest.raises(ValueError, match="has shape"):
        read_tiff_stack(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_tiff_stack(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tif slices"):
        read_tiff_stack(tmp_path / "empty")


def test_synapse_table_errors(tmp_path, tiles):
    table = assemble_bbox(tiles)[3]
    table.drop(columns=["side_2_coord_3"]).to_excel(tmp_path / "t.xlsx", index=False)
    with pytest.raises(ValueError, match="side_2_coord_3"):
        read_synapse_table(tmp_path / "t.xlsx")
    with pytest.raises(FileNotFoundError):
        read_synapse_table(tmp_path / "none.xlsx")
    raw, seg, mask, _ = assemble_bbox(tiles)
    with pytest.raises(ValueError, match="outside the volume"):
        write_original_layout(tmp_path, "b", raw, seg, mask, table.assign(central_coord_1=48))
    with pytest.raises(ValueError, match="one shape"):
        write_original_layout(tmp_path, "b", raw, seg[:, :, :10], mask, table)
    with pytest.raises(ValueError, match="bbox must be"):
        write_original_layout(tmp_path, "../b", raw, seg, mask, table)


# ---------------------------------------------------------------- cube preparation

@pytest.mark.parametrize("centre", [(0, 0, 0), (4, 5, 6), (2, 3, 3), (0, 5, 3)])
@pytest.mark.parametrize("size", [4, 5, 9])
def test_crop_is_centred_and_padded_symmetrically(centre, size):
    volume = np.arange(1, 5 * 6 * 7 + 1, dtype=np.int16).reshape(5, 6, 7)
    padded = np.pad(volume, size)
    start = [c - size // 2 + size for c in centre]
    expected = padded[start[0]:start[0] + size, start[1]:start[1] + size, start[2]:start[2] + size]
    crop = crop_cube(volume, centre, size)
    assert crop.dtype == np.int16 and np.array_equal(crop, expected)
    assert crop[size // 2, size // 2, size // 2] == volume[centre]


def test_crop_errors():
    with pytest.raises(ValueError, match="3-D"):
        crop_cube(np.zeros((4, 4)), (1, 1), 2)
    with pytest.raises(ValueError, match="inside the volume"):
        crop_cube(np.zeros((4, 4, 4)), (1, 1, 4), 2)
    with pytest.raises(ValueError, match="size"):
        crop_cube(np.zeros((4, 4, 4)), (1, 1, 1), 0)


def test_normalise_cube():
    x = np.array([[[3.0, 5.0], [7.0, 11.0]]])
    assert np.allclose(normalise_cube(x), (x - 3) / 8) and normalise_cube(x).dtype == np.float32
    assert np.array_equal(normalise_cube(np.full((2, 2, 2), 4.0)), np.zeros((2, 2, 2)))
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN"):
            normalise_cube(np.array([[[1.0, bad]]]))


def hand_made():
    """7³: PRE below z = 3, POST above; two vesicle clouds (the first nearer the centre), one cleft, one mitochondrion."""
    inst = np.full((7, 7, 7), 3, np.int32)
    inst[:3], inst[4:] = PRE, POST
    inst[3] = 0
    sem = np.zeros((7, 7, 7), np.uint8)
    near, far, cleft, mito = (2, 3, 3), (0, 0, 0), (3, 3, 3), (5, 6, 6)
    sem[near] = sem[far] = SEMANTIC_LABELS["vesicle_cloud"]
    sem[cleft] = SEMANTIC_LABELS["cleft"]
    sem[mito] = SEMANTIC_LABELS["mitochondrion"]
    return inst, sem, {"near": near, "far": far, "cleft": cleft, "mito": mito}


def test_segmentation_mask_each_type():
    inst, sem, at_ = hand_made()
    pre, post = inst == PRE, inst == POST
    one = lambda *points: np.isin(np.arange(7 ** 3).reshape(7, 7, 7), [np.ravel_multi_index(p, (7, 7, 7)) for p in points])
    expected = {0: np.ones_like(pre), 1: pre, 2: post, 3: pre | post, 4: one(at_["near"], at_["cleft"]),
                5: pre | post | one(at_["cleft"]), 6: one(at_["near"]), 7: one(at_["cleft"]), 8: one(at_["mito"]),
                9: one(at_["near"], at_["far"], at_["cleft"]), 10: pre | one(at_["cleft"])}
    assert sorted(SEGMENTATION_TYPES) == list(range(11))
    for seg_type, want in expected.items():
        got = segmentation_mask(inst, sem, seg_type)
        assert got.dtype == bool and np.array_equal(got, want), seg_type
    assert segmentation_mask(inst, sem, 6, centre_zyx=(0, 0, 1))[at_["far"]]      # the other cloud is now closer
    assert np.array_equal(segmentation_mask(np.where(inst == PRE, 9, inst), sem, 1, pre_id=9), pre)


def test_segmentation_mask_errors():
    inst, sem, _ = hand_made()
    with pytest.raises(ValueError, match="missing mask"):
        segmentation_mask(inst, np.zeros_like(sem), 4)
    with pytest.raises(ValueError, match="missing mask"):
        segmentation_mask(np.zeros_like(inst), sem, 1)
    with pytest.raises(ValueError, match="seg_type must be one of"):
        segmentation_mask(inst, sem, 12)
    with pytest.raises(ValueError, match="one shape"):
        segmentation_mask(inst, sem[:3], 0)


def test_blend_formula():
    raw = np.array([[[0.0, 0.2, 1.0]]])
    mask = np.array([[[True, False, False]]])
    assert np.allclose(blend_outside_mask(raw, mask, 1.0), [[[0.0, 0.6, 0.6]]])
    assert np.allclose(blend_outside_mask(raw, mask, 0.0), raw)
    assert np.allclose(blend_outside_mask(raw, mask, 0.25, gray=0.4), [[[0.0, 0.25 * 0.4 + 0.75 * 0.2, 0.25 * 0.4 + 0.75]]])
    with pytest.raises(ValueError, match="alpha"):
        blend_outside_mask(raw, mask, 1.5)
    with pytest.raises(ValueError, match="boolean"):
        blend_outside_mask(raw, mask.astype(int), 0.5)


def test_prepare_cube():
    inst, sem, _ = hand_made()
    raw = np.random.default_rng(0).random((7, 7, 7)) * 50 + 10
    cube = SynapseCube(raw, inst, sem, {})
    assert np.allclose(prepare_cube(cube), normalise_cube(raw))
    out = prepare_cube(cube, seg_type=10, alpha=1.0)
    assert out.dtype == np.float32 and out.shape == (7, 7, 7)
    assert np.allclose(out[inst == POST], 0.6) and np.allclose(out[:3], normalise_cube(raw)[:3])
    with pytest.raises(ValueError, match="3-D cube"):
        prepare_cube(SynapseCube(raw[:, :, :5], inst, sem, {}))
    with pytest.raises(ValueError, match="3-D cube"):
        prepare_cube(SynapseCube(raw[0], inst, sem, {}))
    with pytest.raises(ValueError, match="must match"):
        prepare_cube(SynapseCube(raw, inst[:5, :5, :5], sem, {}))
    with pytest.raises(ValueError, match="missing mask"):
        prepare_cube(SynapseCube(raw, inst, np.zeros_like(sem), {}), seg_type=8)


def test_synapse_table_coordinates_must_be_whole_numbers(tmp_path, tiles):
    table = assemble_bbox(tiles)[3]
    table.astype({"central_coord_1": float}).to_excel(tmp_path / "f.xlsx", index=False)
    assert read_synapse_table(tmp_path / "f.xlsx").central_coord_1.dtype == np.int64      # 8.0 is a voxel index
    table.assign(central_coord_1=[1.5, 2.0, 3.0]).to_excel(tmp_path / "h.xlsx", index=False)
    with pytest.raises(ValueError, match="whole voxel numbers"):
        read_synapse_table(tmp_path / "h.xlsx")


def test_cubes_from_bbox_with_per_bbox_label_ids_and_bad_sides(tmp_path, tiles):
    raw, seg, mask, table = assemble_bbox(tiles)
    original_ids = np.array([0, 6, 7, 5], np.uint8)[mask]        # vesicle 6, cleft 7, mitochondrion 5, as in bbox 1
    original_ids[(mask == 0) & (seg == 0)] = 8                    # a second cleft label on the extracellular gap
    write_original_layout(tmp_path, "bbox1", raw, seg, original_ids, table)
    cubes = cubes_from_bbox(tmp_path, "bbox1", 16, labels={"vesicle_cloud": 6, "cleft": (7, 8), "mitochondrion": 5})
    gap = (tiles[0].semantic == 0) & (tiles[0].instance == 0)
    assert np.array_equal(cubes[0].semantic, np.where(gap, SEMANTIC_LABELS["cleft"], tiles[0].semantic))
    with pytest.raises(ValueError, match="labels must map"):
        cubes_from_bbox(tmp_path, "bbox1", 16, labels={"cleft": 7})
    write_original_layout(tmp_path, "same", raw, seg, mask, table.assign(side_2_coord_1=table.side_1_coord_1,
                                                                         side_2_coord_2=table.side_1_coord_2,
                                                                         side_2_coord_3=table.side_1_coord_3))
    with pytest.raises(ValueError, match="two different neurites"):
        cubes_from_bbox(tmp_path, "same", 16)


# ---------------------------------------------------------------- loader fidelity and bad input (issue #10)

ORIGINAL_MASKS = "vesicle_cloud__syn_interface__mitochondria_annotation"


def write_slices(folder, numbers, fmt="slice_{}.tif"):
    """One 2 x 3 slice per number, every voxel holding the number."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        tifffile.imwrite(folder / fmt.format(n), np.full((2, 3), n, np.uint16))


def test_slices_in_natural_order(tmp_path):
    write_slices(tmp_path / "s", range(12))                   # slice_0 .. slice_11, not zero-padded
    assert sorted(p.name for p in (tmp_path / "s").iterdir())[:4] == ["slice_0.tif", "slice_1.tif", "slice_10.tif", "slice_11.tif"]
    assert read_tiff_stack(tmp_path / "s")[:, 0, 0].tolist() == list(range(12))


def test_slice_gaps_and_repeats_are_refused(tmp_path):
    write_slices(tmp_path / "gap", [0, 1, 3])
    with pytest.raises(ValueError, match=r"gap lacks slice number\(s\) \[2\]"):
        read_tiff_stack(tmp_path / "gap")
    write_slices(tmp_path / "twice", [0, 1])
    write_slices(tmp_path / "twice", [1], "slice_{:04d}.tif")
    with pytest.raises(ValueError, match=r"slice numbers \[1\] occur in more than one file"):
        read_tiff_stack(tmp_path / "twice")
    write_slices(tmp_path / "mixed", range(24))                # one slice named in words would sort after slice_23: refused
    tifffile.imwrite(tmp_path / "mixed" / "slice_seven.tif", np.full((2, 3), 7, np.uint16))
    with pytest.raises(ValueError, match=r"mixes numbered and unnumbered slice names \(\['slice_seven.tif'\]"):
        read_tiff_stack(tmp_path / "mixed")
    (tmp_path / "words").mkdir()                                # no numbers at all: natural order of the names
    for name in ("a", "b"): tifffile.imwrite(tmp_path / "words" / f"slice_{name}.tif", np.zeros((2, 3), np.uint16))
    assert read_tiff_stack(tmp_path / "words").shape == (2, 2, 3)


def test_stacks_with_different_slice_numbers_are_refused(tmp_path, tiles):
    write_original_layout(tmp_path, "b", *assemble_bbox(tiles))
    seg = tmp_path / "seg" / "b"
    for z in reversed(range(16)):                             # seg renumbered 1..16: same shape, shifted by one slice
        (seg / f"slice_{z:04d}.tif").rename(seg / f"slice_{z + 1:04d}.tif")
    with pytest.raises(ValueError, match=r"slice numbers of seg .* differ: missing from seg: \[0\]; missing from raw: \[16\]"):
        load_bbox(tmp_path, "b")
    write_original_layout(tmp_path, "c", *assemble_bbox(tiles))
    (tmp_path / "add_mask" / "c" / "slice_0015.tif").unlink()
    with pytest.raises(ValueError, match=r"add_mask .*add_mask/c\) and raw .* missing from add_mask: \[15\]"):
        load_bbox(tmp_path, "c")


def test_tables_without_rows_or_with_repeated_names_are_refused(tmp_path, tiles):
    table = assemble_bbox(tiles)[3]
    table.iloc[:0].to_excel(tmp_path / "empty.xlsx", index=False)
    with pytest.raises(ValueError, match="has no rows"):
        read_synapse_table(tmp_path / "empty.xlsx")
    table.assign(Var1=["a", "b", "a"]).to_excel(tmp_path / "twice.xlsx", index=False)
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        read_synapse_table(tmp_path / "twice.xlsx")


def test_original_mask_folder_round_trip(tmp_path, tiles):
    raw, seg, mask, table = assemble_bbox(tiles)
    root = tmp_path / "data" / "7_bboxes_plus_seg"
    write_original_layout(root, "bbox1", raw, seg, mask, table, original_naming=True)
    assert not (root / "add_mask").exists()
    assert len(list((tmp_path / "data" / ORIGINAL_MASKS / "bbox_1").glob("slice_*.tif"))) == 16
    assert np.array_equal(load_bbox(root, "bbox1")[2], mask)
    assert np.array_equal(cubes_from_bbox(root, "bbox1", 16)[1].semantic, tiles[1].semantic)
    # an explicit mask folder anywhere
    moved = (tmp_path / "data" / ORIGINAL_MASKS / "bbox_1").rename(tmp_path / "my_masks")
    assert np.array_equal(load_bbox(root, "bbox1", mask_dir=moved)[2], mask)
    with pytest.raises(FileNotFoundError) as err:
        load_bbox(root, "bbox1")
    assert str(root / "add_mask" / "bbox1") in str(err.value) and str(tmp_path / "data" / ORIGINAL_MASKS / "bbox_1") in str(err.value)
    with pytest.raises(FileNotFoundError, match="tried .*elsewhere"):
        load_bbox(root, "bbox1", mask_dir=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="original_naming needs a bbox name ending in its number"):
        write_original_layout(root, "b", raw, seg, mask, table, original_naming=True)


def test_original_mask_label_table():
    # SynapseClusterEM's synapse/dl/mask_labels.py: (mito, vesicle, cleft, cleft2)
    rows = {1: (5, 6, [7]), 2: (1, 3, [2, 4]), 3: (6, 7, [9, 8]), 4: (3, 2, [1, 4]), 5: (1, 3, [2, 4]), 6: (5, 6, [7]), 7: (1, 2, [4, 3])}
    assert ORIGINAL_MASK_LABELS == {f"bbox{n}": {"mitochondrion": m, "vesicle_cloud": v, "cleft": c} for n, (m, v, c) in rows.items()}
    assert original_mask_labels("bbox_4") == original_mask_labels(4) == {"mitochondrion": 3, "vesicle_cloud": 2, "cleft": [1, 4]}
    original_mask_labels("bbox1")["cleft"].append(99)         # a copy: the table stays
    assert ORIGINAL_MASK_LABELS["bbox1"]["cleft"] == [7]
    for bad in ("bbox8", "bbox", "b1x"):
        with pytest.raises(ValueError, match="unknown original bbox"):
            original_mask_labels(bad)


def hand_bbox(root, cloud_neurite=10, cloud_z=(3, 6), mito_z=(9, 11), sides_swapped=False):
    """A 12³ bbox: neurite 10 below the cleft plane z = 6, neurite 20 above, neurite 30 at x >= 10; ids as in bbox 1
    (mitochondrion 5, vesicle cloud 6, cleft 7). The cloud (in `cloud_neurite`, z in cloud_z) sits under the cleft,
    the mitochondrion in neurite 20 above it."""
    seg = np.full((12, 12, 12), 10, np.uint32)
    seg[7:], seg[6] = 20, 0
    seg[:, :, 10:] = 30
    mask = np.zeros_like(seg, dtype=np.uint8)
    mask[6, 4:8, 4:8] = 7
    x = slice(4, 8) if cloud_neurite != 30 else slice(10, 12)
    mask[cloud_z[0]:cloud_z[1], 4:8, x] = 6
    mask[mito_z[0]:mito_z[1], 4:8, 4:8] = 5
    side_1, side_2 = ((6, 6, 9), (6, 6, 3)) if sides_swapped else ((6, 6, 3), (6, 6, 9))
    table = pd.DataFrame([["s1", 6, 6, 6, *side_1, *side_2]], columns=list(SYNAPSE_TABLE_COLUMNS))
    write_original_layout(root, "bbox1", np.zeros(seg.shape, np.uint8), seg, mask, table)
    return root


BBOX1 = {"mitochondrion": 5, "vesicle_cloud": 6, "cleft": 7}
SWAPPED = {"mitochondrion": 6, "vesicle_cloud": 5, "cleft": 7}


def test_right_ids_pass_and_decide_the_presynaptic_side(tmp_path):
    cube, = cubes_from_bbox(hand_bbox(tmp_path), "bbox1", 12, labels=BBOX1)
    assert cube.metadata["pre_side"] == 1 and (cube.instance[:6, :, :10] == PRE).all() and (cube.instance[7:, :, :10] == POST).all()
    assert (cube.semantic[3:6, 4:8, 4:8] == SEMANTIC_LABELS["vesicle_cloud"]).all()
    cube, = cubes_from_bbox(hand_bbox(tmp_path / "s", sides_swapped=True), "bbox1", 12, labels=original_mask_labels("bbox1"))
    assert cube.metadata["pre_side"] == 2 and (cube.instance[:6, :, :10] == PRE).all()


def test_swapped_ids_are_refused_on_a_hand_built_bbox(tmp_path):
    root = hand_bbox(tmp_path)
    # the "cloud" is the mitochondrion at 3 voxels, the real cloud at 1: the original would call neurite 20 presynaptic
    with pytest.raises(ValueError, match=r"mitochondrion lies nearer the cleft \(1.0 voxels\) than the vesicle cloud \(3.0\)"):
        cubes_from_bbox(root, "bbox1", 12, labels=SWAPPED)
    with pytest.raises(ValueError, match=r"lies 3.0 voxels from the cleft \(max_cloud_gap_vox = 2\); the vesicle-cloud id is "
                                         r"probably wrong for this bbox \(the original's ids for bbox1: \{'mitochondrion': 5"):
        cubes_from_bbox(root, "bbox1", 12, labels=SWAPPED, max_cloud_gap_vox=2)
    with pytest.raises(ValueError, match=r"lies 5.0 voxels from the cleft \(max_cloud_gap_vox = 4\)"):
        cubes_from_bbox(hand_bbox(tmp_path / "far", cloud_z=(0, 2)), "bbox1", 12, labels=BBOX1, max_cloud_gap_vox=4)
    with pytest.raises(ValueError, match=r"overlaps neither side neurite \(ids \[10, 20\]\)"):
        cubes_from_bbox(hand_bbox(tmp_path / "other", cloud_neurite=30), "bbox1", 12, labels=BBOX1)
    with pytest.raises(ValueError, match="max_cloud_gap_vox must be a number >= 0"):
        cubes_from_bbox(root, "bbox1", 12, labels=BBOX1, max_cloud_gap_vox=-1)


def test_label_ids_absent_or_shared_are_refused(tmp_path):
    root = hand_bbox(tmp_path)
    with pytest.raises(ValueError, match=r"bbox1: cleft id\(s\) \[8\] do not occur in its mask volume \(ids present: \[0, 5, 6, 7\]\)"):
        cubes_from_bbox(root, "bbox1", 12, labels={**BBOX1, "cleft": [7, 8]})
    with pytest.raises(ValueError, match="labels give id 6 to both"):
        cubes_from_bbox(root, "bbox1", 12, labels={**BBOX1, "cleft": [7, 6]})
    assert check_mask_labels({"vesicle_cloud": 6, "cleft": (7, 7), "mitochondrion": 5})["cleft"] == [7]   # cleft2 = cleft
    for bad in (0, [], "6", 6.0, True):
        with pytest.raises(ValueError, match="labels\\['vesicle_cloud'\\] must be a positive integer id"):
            check_mask_labels({**BBOX1, "vesicle_cloud": bad})


@pytest.fixture(scope="module")
def three_kinds():
    """24³ cubes at 25 nm: no mitochondrion (spine), a mitochondrion in the postsynaptic shaft, one in the presynaptic bouton."""
    ds = SyntheticSynapses(GeneratorConfig(cube_size=24, voxel_nm=25.0, n_bboxes=1, axons_per_bbox=3, synapses_per_axon=1,
                                           n_classes=3, jitter_nm=0.0), seed=3)
    return [ds[i] for i in range(3)]


def test_swapped_ids_are_refused_on_generated_synapses(tmp_path, three_kinds):
    mito = lambda cube, side: int(((cube.semantic == SEMANTIC_LABELS["mitochondrion"]) & (cube.instance == side)).sum())
    assert [c.metadata["mitochondrion"] for c in three_kinds] == [False, True, True]
    assert mito(three_kinds[1], POST) > 0 == mito(three_kinds[1], PRE)     # read as the cloud, it would make POST presynaptic
    assert mito(three_kinds[2], PRE) > 0 == mito(three_kinds[2], POST)
    raw, seg, mask, table = assemble_bbox(three_kinds)
    swapped = {"vesicle_cloud": SEMANTIC_LABELS["mitochondrion"], "cleft": SEMANTIC_LABELS["cleft"],
               "mitochondrion": SEMANTIC_LABELS["vesicle_cloud"]}
    expected = ["the cube holds no vesicle cloud", "a mitochondrion lies nearer the cleft", "a mitochondrion lies nearer the cleft"]
    for i, reason in enumerate(expected):                     # one synapse at a time, all in the same volume
        write_original_layout(tmp_path, "bbox1", raw, seg, mask, table.iloc[[i]])
        with pytest.raises(ValueError, match=f"bbox1, synapse {table.Var1[i]}: {reason}.*vesicle-cloud id is probably wrong"):
            cubes_from_bbox(tmp_path, "bbox1", 24, labels=swapped)
        assert cubes_from_bbox(tmp_path, "bbox1", 24)[0].metadata["pre_side"] == 1
    # 100 nm at 25 nm voxels: the shaft mitochondrion is also too far from the cleft to be its vesicle cloud
    write_original_layout(tmp_path, "bbox1", raw, seg, mask, table.iloc[[1]])
    with pytest.raises(ValueError, match="voxels from the cleft \\(max_cloud_gap_vox = 4\\)"):
        cubes_from_bbox(tmp_path, "bbox1", 24, labels=swapped, max_cloud_gap_vox=4)


def test_cli_mask_label_options(tmp_path, capsys):
    from project_lib.synapse.__main__ import main, parse_mask_labels
    assert parse_mask_labels(["cleft=7,7", "mitochondrion=5", "vesicle_cloud=6"]) == {"cleft": [7], "mitochondrion": [5], "vesicle_cloud": [6]}
    for items, message in [(["cleft=7;8", "mitochondrion=5", "vesicle_cloud=6"], "--mask_labels: expected NAME=ID"),
                           (["cleft", "mitochondrion=5", "vesicle_cloud=6"], "--mask_labels: expected NAME=ID"),
                           (["cleft=7", "cleft=8", "vesicle_cloud=6"], "--mask_labels: cleft is given twice"),
                           (["cleft=7", "vesicle_cloud=6"], "--mask_labels: labels must map exactly"),
                           (["cleft=7", "mitochondrion=6", "vesicle_cloud=6"], "--mask_labels: labels give id 6 to both")]:
        with pytest.raises(ValueError, match=message):
            parse_mask_labels(items)
    base = ["--random_init", "--cube_size", "16", "--classifier_hidden", "8", "--output_dir", str(tmp_path / "out"), "--quiet"]
    for extra, message in [(["--data_root", str(tmp_path), "--mask_labels", "cleft=x"], "--mask_labels: expected NAME=ID"),
                           (["--data_root", str(tmp_path), "--bboxes", "bbox9", "--original_labels"], "--original_labels: unknown original bbox 'bbox9'"),
                           (["--original_labels"], "apply to --data_root"),
                           (["--data_root", str(tmp_path), "--original_labels", "--mask_labels", "cleft=7"], "not allowed with argument")]:
        with pytest.raises(SystemExit) as exit_:
            main(base + extra)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    # the per-bbox table reaches the loader: bbox 2's ids (1, 3, 2/4) on a bbox written with bbox 1's ids are refused
    hand_bbox(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--data_root", str(tmp_path), "--mask_labels", "vesicle_cloud=3", "cleft=2,4", "mitochondrion=1"])
    assert exit_.value.code == 2 and "bbox1: vesicle_cloud id(s) [3] do not occur" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "2"], "--alpha must be in [0, 1], got 2.0"),
    (["--n_clusters", "1"], "--n_clusters must be >= 2, got 1"),
    (["--voxel_nm", "0"], "--voxel_nm must be > 0, got 0.0"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--cube_size", "3"], "--cube_size 3: input_size must be >= 16, got 3"),
    (["--extraction_method", "stage_specific", "--layer_num", "99"], "--layer_num must index model.features (0 to 33), got 99"),
    (["--data_root", "/nonexistent"], "--data_root /nonexistent is not a folder"),
    (["--output_dir", "/proc/synapse_out"], "--output_dir /proc/synapse_out cannot be written"),
    (["--cube_size", "32", "--voxel_nm", "8", "--n_clusters", "100000"], "--n_clusters 100000 exceeds the 48 synapses found"),
    (["--cube_size", "16", "--voxel_nm", "8"], "needs a field of view of at least"),
])
def test_cli_errors_are_one_line_before_any_extraction(extra, message, tmp_path, capsys, monkeypatch):
    from project_lib.synapse import __main__ as cli
    monkeypatch.setattr(cli, "extract_features", lambda *a, **k: pytest.fail("extraction ran before the error"))
    args = ["--random_init", "--cube_size", "16", "--classifier_hidden", "8", "--output_dir", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(args + extra)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err


def test_cli_refuses_a_missing_or_corrupt_checkpoint(tmp_path, capsys):
    from project_lib.synapse.__main__ import main
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    for path, message in ((tmp_path / "none.pt", "does not exist"), (tmp_path / "broken.pt", "--checkpoint")):
        with pytest.raises(SystemExit) as exit_:
            main(["--checkpoint", str(path), "--cube_size", "16", "--classifier_hidden", "8", "--output_dir", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, err


def test_mask_thickness_of_slabs_and_a_ball():
    for t in (1, 2, 3, 5):   # a slab t voxels thick: exactly t, whatever its other sides
        slab = np.zeros((12, 12, 12), bool)
        slab[2:2 + t, 1:10, 2:11] = True
        assert mask_thickness(slab) == pytest.approx(t, abs=1e-9)
    z, y, x = np.ogrid[:20, :20, :20]
    assert mask_thickness((z - 10) ** 2 + (y - 10) ** 2 + (x - 10) ** 2 < 36) > 8   # a ball of radius 6 is no sheet


def test_swapped_or_rotated_cleft_and_cloud_ids_are_refused_from_the_geometry(tmp_path):
    root = hand_bbox(tmp_path)
    # cleft and cloud swapped: the "cleft" is the 3-voxel-thick cloud, thicker than the one-voxel "cloud" sheet
    with pytest.raises(ValueError, match=r"the cleft nearest the centre is 3 voxels thick, no thinner than the vesicle cloud \(1\): a cleft is a thin "
                                         r"sheet; the cleft and vesicle-cloud ids are probably swapped"):
        cubes_from_bbox(root, "bbox1", 12, labels={"mitochondrion": 5, "vesicle_cloud": 7, "cleft": 6})
    # rotated (cleft <- mitochondrion, cloud <- cleft, mitochondrion <- cloud): the "cleft" lies inside neurite 20 only
    with pytest.raises(ValueError, match=r"the cleft nearest the centre does not touch both side neurites \(ids \[10, 20\]; it touches \[20\]\)"):
        cubes_from_bbox(root, "bbox1", 12, labels={"mitochondrion": 6, "vesicle_cloud": 7, "cleft": 5})
    assert len(cubes_from_bbox(root, "bbox1", 12, labels=BBOX1)) == 1   # the right ids pass
