"""Synapse study: VGG3D layout, stage extraction, checkpoints, Grad-CAM, clustering and the CLI, against independent oracles."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cdist
from torch import nn

from project_lib.synapse.analysis import (centre_prior, dummy_head_target, grad_cam, localisation_auc, presynapse_consistency,
                                          probe_target, run_clustering_analysis)
from project_lib.synapse.data import GeneratorConfig, SyntheticSynapses, prepare_cube
from project_lib.synapse.model import (VGG3D, ExtractionConfig, VGG3DStageExtractor, cubes_to_input, extract_features,
                                       extract_stage_specific_features, layer_table, load_checkpoint)
from project_lib.synapse.stats import adjusted_rand, affine_r2, ari_permutation_test, kmeans_labels
from project_lib.synapse.study import fit_probe, network_features, oracle_features
from project_lib.engine import load_weights
from project_lib.synapse.train import (Augmentation, ContrastiveConfig, ContrastiveVGG, InputRows, PretrainingSet, ProxyTrainingConfig,
                                      array_hash, contrastive_validation, proxy_targets, reestimate_batchnorm, train_contrastive,
                                      train_proxy)

TINY = GeneratorConfig(cube_size=16, voxel_nm=40.0, n_classes=3, n_bboxes=2, axons_per_bbox=3, synapses_per_axon=2)
QUIET = ExtractionConfig(batch_size=4, progress=False)


def test_every_features_index_has_the_original_module_and_channels():
    # (index, type, out channels) of the original VGG3D (fmaps 24, n_convolutions (4, 2, 2, 2)), written out by hand
    blocks = [(24, 4), (48, 2), (96, 2), (192, 2)]
    expected = []
    for channels, n_conv in blocks:
        expected += [("Conv3d", channels), ("BatchNorm3d", channels), ("ReLU", None)] * n_conv + [("MaxPool3d", None)]
    model = VGG3D()
    assert len(model.features) == len(expected) == 34
    for i, (module, (kind, channels)) in enumerate(zip(model.features, expected)):
        assert type(module).__name__ == kind, i
        if kind == "Conv3d": assert module.out_channels == channels and module.kernel_size == (3, 3, 3) and module.padding == (1, 1, 1)
        if kind == "BatchNorm3d": assert module.num_features == channels
    assert (model.features[20].in_channels, model.features[20].out_channels) == (48, 96)
    assert [m.in_features for m in model.classifier if isinstance(m, nn.Linear)] == [24000, 4096, 4096]
    assert model.classifier[-1].out_features == 7


def test_layer_shapes_follow_the_forward_pass():
    model = VGG3D(input_size=32).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    table = layer_table(model)
    with torch.no_grad():
        for i, module in enumerate(model.features):
            x = module(x)
            assert x.shape[1] == table.channels[i] and x.shape[2] == table.side[i], i


def test_stage_extractor_equals_slicing_the_full_forward_pass():
    torch.manual_seed(0)
    model = VGG3D(input_size=32).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    extractor = VGG3DStageExtractor(model)
    activations = []
    with torch.no_grad():
        h = x
        for module in model.features:
            h = module(h); activations.append(h.mean(dim=(2, 3, 4)))
        for n in (0, 9, 20, 27, 33):
            torch.testing.assert_close(extractor.extract_layer(n, x), activations[n])
        torch.testing.assert_close(extractor.extract_layer_20(x), activations[20])
        multi = extractor.extract_layers([3, 20], x)
        torch.testing.assert_close(multi[3], activations[3])


def test_flops_of_the_original_input():
    table = layer_table(VGG3D())
    conv = table[table.module == "Conv3d"]
    # first conv: 2 * 1 * 24 * 27 multiply-adds per output voxel of 80^3
    assert conv.gflop.iloc[0] == pytest.approx(2 * 24 * 27 * 80 ** 3 / 1e9)
    assert table.cumulative_gflop.iloc[-1] == pytest.approx(69.4, abs=0.1)


def test_features_are_named_and_counted_as_the_seed_says():
    data = SyntheticSynapses(TINY, seed=0)
    model = VGG3D(input_size=16, classifier_hidden=8)
    standard = extract_features(model, data, QUIET)
    staged = extract_stage_specific_features(model, data, QUIET, layer_num=20)
    assert [c for c in standard if c.startswith("feat_")] == [f"feat_{i}" for i in range(1, 193)]
    assert [c for c in staged if "feat_" in c] == [f"layer20_feat_{i}" for i in range(1, 97)]
    assert len(standard) == len(staged) == len(data)
    for col in ("synapse_id", "bbox", "axon", "synapse_class"): assert col in standard and col in staged


def test_extraction_is_deterministic_and_batch_independent():
    data = SyntheticSynapses(TINY, seed=1)
    torch.manual_seed(3)
    model = VGG3D(input_size=16, classifier_hidden=8)
    a = extract_features(model, data, ExtractionConfig(batch_size=1, progress=False))
    b = extract_features(model, data, ExtractionConfig(batch_size=5, progress=False))
    np.testing.assert_allclose(a.filter(like="feat_").to_numpy(), b.filter(like="feat_").to_numpy(), rtol=1e-4, atol=1e-6)


def test_checkpoint_loader_fails_loudly(tmp_path):
    good = VGG3D(input_size=16, classifier_hidden=8)
    torch.save({"state_dict": good.state_dict()}, tmp_path / "good.pt")
    loaded = load_checkpoint(VGG3D(input_size=16, classifier_hidden=8), tmp_path / "good.pt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in good.state_dict().items())
    with pytest.raises(ValueError, match="does not match"):             # another head: the original returned random weights here
        load_checkpoint(VGG3D(input_size=16, classifier_hidden=16), tmp_path / "good.pt")
    state = good.state_dict(); state.pop("features.0.weight")
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing \\['features.0.weight'\\]"):
        load_checkpoint(VGG3D(input_size=16, classifier_hidden=8), tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(good, tmp_path / "corrupt.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(good, tmp_path / "absent.pt")


@pytest.mark.parametrize("bad", [torch.zeros(1, 1, 24, 24, 24), torch.zeros(1, 16, 16), torch.zeros(1, 1, 16, 16),
                                 torch.zeros(1, 2, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16, dtype=torch.int64)])
def test_bad_network_inputs_are_refused(bad):
    with pytest.raises(ValueError, match="input must be"):
        VGG3D(input_size=16, classifier_hidden=8)(bad)


def _copying_network():
    "Every convolution copies channel 0 forward through identity BatchNorms: the pooled output is the input's mean."
    model = VGG3D(input_size=16, fmaps=2, n_convolutions=(1, 1, 1, 1), classifier_hidden=4).eval()
    with torch.no_grad():
        for prm in model.parameters(): prm.zero_()
        for m in model.features:
            if isinstance(m, nn.BatchNorm3d): m.weight.fill_(1.0); m.running_var.fill_(1.0 - m.eps); m.running_mean.zero_()
            if isinstance(m, nn.Conv3d): m.weight[0, 0, 1, 1, 1] = 1.0
    return model


def test_grad_cam_localises_what_the_head_reads():
    # every convolution copies channel 0 forward, so the pooled output the head reads is the bright blob of the input:
    # the map at layer 0 must sit on the blob (hand-made network, dummy head)
    model = _copying_network()
    x = torch.zeros(1, 1, 16, 16, 16); x[0, 0, 2:6, 2:6, 2:6] = 1.0
    cams = grad_cam(model, x, [0, 4], target=dummy_head_target)
    mask = x[0, 0].numpy() > 0
    assert localisation_auc(cams[0][0], mask) == pytest.approx(1.0)
    assert cams[0][0][mask].min() == pytest.approx(1.0) and cams[0][0][~mask].max() < 1.0


def test_localisation_auc_on_a_hand_counted_case():
    # 2 mask voxels (0.35, 0.8) against 6 others (0.1, 0.4, 0.2, 0.2, 0.9, 0.0): of the 12 pairs the mask voxel is
    # higher in 0.35 > 0.1, 0.2, 0.2, 0.0 and 0.8 > 0.1, 0.4, 0.2, 0.2, 0.0 -> 9 / 12
    cam = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.2, 0.9, 0.0]).reshape(2, 2, 2)
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 0], bool).reshape(2, 2, 2)
    assert localisation_auc(cam, mask) == pytest.approx(9 / 12)
    with pytest.raises(ValueError, match="differ in shape"):
        localisation_auc(cam, mask[:1])


def _planted(n_per=25, k=4, d=6, shift=6.0, seed=0):
    rng = np.random.default_rng(seed)
    cls = np.repeat(np.arange(k), n_per)
    x = rng.normal(size=(len(cls), d)) + shift * np.eye(k, d)[cls]
    df = pd.DataFrame(x * np.array([1, 100, 0.01, 1, 10, 1]), columns=[f"feat_{i + 1}" for i in range(d)])
    df["synapse_class"] = cls
    df["bbox"] = rng.integers(0, 5, len(cls))                         # independent of the class
    df["axon"] = np.arange(len(cls)) // 5
    return df


def test_clustering_recovers_planted_clusters_and_ignores_an_independent_label(tmp_path):
    # known answer: four well-separated classes (ARI 1) and a bbox label drawn independently of them (ARI about 0)
    df = _planted()
    out, metrics = run_clustering_analysis(df, tmp_path, n_clusters=4, seed=0, embeddings=False)
    assert metrics["ari_class"] == pytest.approx(1.0) and metrics["nmi_class"] == pytest.approx(1.0)
    assert abs(metrics["ari_bbox"]) < 0.05
    written = pd.read_csv(tmp_path / "clustered_features.csv")
    assert list(written.cluster) == list(out.cluster)


def test_unscaled_features_are_dominated_by_the_largest_column():
    # the original clustered unscaled features: a column with 100x the scale decides the clusters alone
    df = _planted()
    _, scaled = run_clustering_analysis(df, None, n_clusters=4, embeddings=False)
    _, raw = run_clustering_analysis(df, None, n_clusters=4, scale=False, embeddings=False)
    assert scaled["ari_class"] > raw["ari_class"] + 0.2


def test_presynapse_consistency_against_scipy():
    rng = np.random.default_rng(1)
    x, axon = rng.normal(size=(12, 3)), np.repeat(np.arange(4), 3)
    d = cdist(x, x)
    same = axon[:, None] == axon[None, :]
    within = d[same & ~np.eye(12, dtype=bool)].mean()
    between = d[~same].mean()
    got = presynapse_consistency(x, axon)
    assert got["within_axon_distance"] == pytest.approx(within) and got["between_axon_distance"] == pytest.approx(between)
    with pytest.raises(ValueError, match="no axon has two synapses"):
        presynapse_consistency(x, np.arange(12))


def test_clustering_bad_input():
    df = _planted()
    df.loc[0, "feat_1"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        run_clustering_analysis(df, None, embeddings=False)
    with pytest.raises(ValueError, match="no feature columns"):
        run_clustering_analysis(df[["synapse_class", "bbox"]], None, embeddings=False)


def test_proxy_training_learns_and_is_deterministic(tmp_path):
    data = SyntheticSynapses(TINY, seed=2)
    x = cubes_to_input([prepare_cube(data[i]) for i in range(len(data))])
    y, mean, std = proxy_targets(data.metadata().iloc[:8])
    yv, _, _ = proxy_targets(data.metadata().iloc[8:], mean, std)
    runs = []
    for i in range(2):
        torch.manual_seed(0)
        model = VGG3D(input_size=16, classifier_hidden=16, dropout=0.0)
        runs.append(train_proxy(model, x[:8], y, x[8:], yv, ProxyTrainingConfig(epochs=6, batch_size=4, lr=1e-3), tmp_path / str(i),
                                progress=False).history)
    pd.testing.assert_frame_equal(runs[0], runs[1])
    assert runs[0].train_loss.iloc[-1] < runs[0].train_loss.iloc[0]
    with pytest.raises(ValueError, match="need targets"):
        train_proxy(VGG3D(input_size=16, classifier_hidden=8), x[:8], y[:-1], x[8:], yv, ProxyTrainingConfig(), tmp_path / "bad")


def test_checkpoints_holding_a_pickled_model_or_non_tensors_are_refused(tmp_path):
    model = VGG3D(input_size=16, classifier_hidden=8)
    torch.save(model, tmp_path / "whole.pt")                            # the whole module, pickled
    with pytest.raises(ValueError, match="pickled project_lib.synapse.model.VGG3D"):
        load_checkpoint(VGG3D(input_size=16, classifier_hidden=8), tmp_path / "whole.pt")
    state = dict(model.state_dict()); state["features.0.weight"] = state["features.0.weight"].tolist()
    torch.save({"model_state_dict": state}, tmp_path / "lists.pt")
    with pytest.raises(ValueError, match="entries \\['features.0.weight'\\] are not tensors"):
        load_checkpoint(VGG3D(input_size=16, classifier_hidden=8), tmp_path / "lists.pt")


def test_nan_inputs_empty_datasets_and_zero_batches_are_refused():
    x = torch.zeros(1, 1, 16, 16, 16); x[0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        VGG3D(input_size=16, classifier_hidden=8)(x)
    with pytest.raises(ValueError, match="batch_size"):
        ExtractionConfig(batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        extract_features(VGG3D(input_size=16, classifier_hidden=8), [], QUIET)


def test_grad_cam_of_a_trained_probe_finds_the_blob_it_was_trained_on():
    # known by construction: cubes are noise, half of them with a bright blob at a random off-centre place; a logistic
    # probe is trained on the pooled features to detect the blob; its Grad-CAM must sit on the blob, beat the centre prior
    model, rng = _copying_network(), np.random.default_rng(0)
    cubes, has, masks = [], [], []
    for i in range(40):
        x = rng.normal(0, 0.05, (16, 16, 16)).astype(np.float32) + 0.1
        mask = np.zeros((16, 16, 16), bool)
        if i % 2:
            c = rng.integers(1, 3, 3) + 10 * rng.integers(0, 2, 3)      # a 4³ blob in a corner region, never the centre
            mask[c[0]:c[0] + 4, c[1]:c[1] + 4, c[2]:c[2] + 4] = True
            x[mask] += 1.0
        cubes.append(x); has.append(i % 2); masks.append(mask)
    inputs = torch.from_numpy(np.stack(cubes))[:, None]
    pooled = network_features(model, inputs, [len(model.features) - 1], batch_size=8)[len(model.features) - 1]
    scaler, probe = fit_probe(pooled[:30], np.array(has[:30]))
    assert probe.score(scaler.transform(pooled[30:]), has[30:]) == 1.0
    target = probe_target(probe.coef_, probe.intercept_, scaler.mean_, scaler.scale_, [0])   # binary: one row of weights
    for i in (31, 33, 35):
        cam = grad_cam(model, inputs[i:i + 1], [0], target)[0][0]
        assert localisation_auc(cam, masks[i]) > 0.99
        assert localisation_auc(centre_prior(16), masks[i]) < 0.6


def test_reestimated_batchnorm_standardises_the_first_layer():
    # independent check of the statistics: after re-estimation the first BatchNorm's eval-mode output over the same
    # cubes has mean 0 and variance 1 per channel (a default-initialised network is far from that)
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16, 16) * 0.5 + 0.3
    model = VGG3D(input_size=16, classifier_hidden=8).eval()
    with torch.no_grad(): before = model.features[:2](x)
    reestimate_batchnorm(model, x, batch_size=8)
    with torch.no_grad(): after = model.features[:2](x)
    assert before.mean(dim=(0, 2, 3, 4)).abs().max() > 0.05
    np.testing.assert_allclose(after.mean(dim=(0, 2, 3, 4)).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(after.var(dim=(0, 2, 3, 4), unbiased=False).numpy(), 1, atol=1e-2)


def test_pooled_layer_20_is_almost_affine_in_pooled_layer_19():
    # the reason the report calls the 96 stage-specific features about 48-dimensional: layer 20 is a convolution of
    # layer 19, and pooling commutes with it up to the zero-padded border
    torch.manual_seed(0)
    data = SyntheticSynapses(GeneratorConfig(cube_size=32, voxel_nm=20.0, n_bboxes=2, axons_per_bbox=8, synapses_per_axon=4), 4)
    x = cubes_to_input([prepare_cube(data[i]) for i in range(len(data))])
    model = VGG3D(input_size=32, classifier_hidden=8)
    reestimate_batchnorm(model, x, batch_size=16)
    f = network_features(model, x, [19, 20], batch_size=16)
    assert f[19].shape[1] == 48 and f[20].shape[1] == 96
    assert affine_r2(f[19], f[20]) > 0.95


def test_axon_level_null_keeps_its_false_positive_rate_at_separation_zero():
    # separation 0: the classes are identical in distribution, so a significant ARI is a false positive; synapses of an
    # axon share trait offsets, so k-means on the true traits groups axons, and a synapse-level null (which ignores that)
    # rejects too often, while the axon-level null must stay near its nominal 5 %
    config = GeneratorConfig(cube_size=16, voxel_nm=40.0, n_classes=4, separation=0.0, n_bboxes=3, axons_per_bbox=8,
                             synapses_per_axon=4)
    axon_p, synapse_p = [], []
    for seed in range(120):
        meta = SyntheticSynapses(config, seed).metadata()
        pred = kmeans_labels(oracle_features(meta), 4, seed)
        labels, axon, bbox = meta.synapse_class.to_numpy(), meta.axon.to_numpy(), meta.bbox.to_numpy()
        one = lambda unit: ari_permutation_test([{"pred": pred, "labels": labels, "unit": unit, "stratum": bbox}], 199, seed)["p_value"]
        axon_p.append(one(axon)); synapse_p.append(one(np.arange(len(meta))))
    axon_rate, synapse_rate = np.mean(np.array(axon_p) <= 0.05), np.mean(np.array(synapse_p) <= 0.05)
    assert axon_rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 120), axon_rate      # within two standard errors of 5 %
    assert synapse_rate > axon_rate, (synapse_rate, axon_rate)


def test_cli_help_and_no_silent_random_weights():
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "project_lib.synapse", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--extraction_method" in run.stdout and "--layer_num" in run.stdout
    run = subprocess.run([sys.executable, "-m", "project_lib.synapse", "--extraction_method", "standard"], capture_output=True, text=True)
    assert run.returncode == 2 and "one of the arguments --checkpoint --random_init is required" in run.stderr


# ---- the training stage's units: evaluation never trains, a finished unit is reused, a changed one retrained ----

def _tiny_params(**changes):
    import dataclasses
    from project_lib.core import load_study_params
    from project_lib.synapse.units import SynapseStudyParams
    return dataclasses.replace(load_study_params("synapse", SynapseStudyParams, "tiny"), train_seeds=[0], pretrain_bboxes=2, **changes)


def _units(p):
    from project_lib.synapse.units import training_units
    return training_units(p, p.pretraining_set().load())


def test_evaluation_refuses_when_the_trainings_are_missing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    out_nb = tmp_path / "synapse.ipynb"
    run = subprocess.run([Path(sys.executable).parent / "papermill", "-k", "python3", "--no-progress-bar", "--cwd", ".", "nbs/studies/synapse.ipynb",
                          out_nb, "-p", "profile", "tiny", "-p", "output_root", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "no pretraining inputs" in run.stderr and "run the training stage" in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "tiny" / "synapse" / "runs").exists()                         # it trained nothing, nor rendered the cache


@pytest.fixture(scope="module")
def trained_units(tmp_path_factory):
    from project_lib.engine import Executor, run_units
    root, units = tmp_path_factory.mktemp("synapse") / "runs", _units(_tiny_params())
    return root, units, run_units(units, root, Executor(n_workers=1))


def test_a_finished_unit_is_reused_not_retrained(trained_units):
    from project_lib.engine import Executor, run_units
    root, units, records = trained_units
    stamps = {f: f.stat().st_mtime_ns for f in root.rglob("*") if f.is_file()}
    assert {f.name for f in stamps} >= {"best.pt", "last.pt", "vgg3d.pt", "unit.json"}
    assert run_units(_units(_tiny_params()), root, Executor(n_workers=1)) == records     # rebuilt units: same identities
    assert {f: f.stat().st_mtime_ns for f in root.rglob("*") if f.is_file()} == stamps   # nothing written again


def test_a_unit_whose_data_changed_is_retrained(trained_units):
    from project_lib.engine import Executor, load_units, run_units
    root, units, records = trained_units
    other = _units(_tiny_params(pretrain_seed=1001))                                     # other pretraining cubes
    assert [u.key for u in other] == [u.key for u in units] and all(a.hash != b.hash for a, b in zip(other, units))
    with pytest.raises(FileNotFoundError, match="not trained with this configuration"):
        load_units(other, root)
    before = (root / "proxy" / "vgg3d.pt").stat().st_mtime_ns
    retrained = run_units(other, root, Executor(n_workers=1))
    assert retrained["proxy"]["history"] != records["proxy"]["history"]
    assert (root / "proxy" / "vgg3d.pt").stat().st_mtime_ns != before
    assert load_units(other, root).keys() == retrained.keys()


# ---- the pretraining inputs on disk: the same bytes as in memory, read a batch at a time ----

def test_pretraining_inputs_from_the_cache_are_the_inputs_rendered_in_memory(tmp_path):
    from project_lib.core import load_study_params
    from project_lib.synapse.units import SynapseStudyParams
    spec = load_study_params("synapse", SynapseStudyParams, "tiny").pretraining_set()
    memory, disk = spec.load(), spec.load(tmp_path)
    assert isinstance(disk["train_x"], InputRows) and isinstance(memory["train_x"], torch.Tensor)
    # the hashes in the tiny units' identities, as the in-memory stage computed them before the cache existed
    assert (array_hash(memory["train_x"]), array_hash(memory["val_x"])) == ("0c5fe325f278be1e", "88bdfb1bcd26b1c5")
    assert (array_hash(disk["train_x"]), array_hash(disk["val_x"])) == ("0c5fe325f278be1e", "88bdfb1bcd26b1c5")
    assert torch.equal(torch.cat(list(disk["val_x"].split(5))), memory["val_x"])
    pd.testing.assert_frame_equal(disk["train_metadata"], memory["train_metadata"])
    assert [f.name for f in tmp_path.iterdir()] == [spec.cache_path(tmp_path).name]   # one file, named by the set and its code


def _read_sizes(monkeypatch):
    """Row counts of every read from an InputRows file, recorded."""
    sizes, read = [], InputRows._read
    def counting(self, rows):
        sizes.append(len(rows))
        return read(self, rows)
    monkeypatch.setattr(InputRows, "_read", counting)
    return sizes


@pytest.fixture
def one_thread():
    """One torch thread, as the stage's units train (2 threads on a busy 2-core machine are ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_contrastive_training_on_the_cache_is_the_training_on_tensors_and_reads_a_batch_at_a_time(tmp_path, monkeypatch, one_thread):
    spec = PretrainingSet(GeneratorConfig(cube_size=16, voxel_nm=40.0, n_bboxes=10, axons_per_bbox=4, synapses_per_axon=2), 3, 0, 1.0, 1)
    config, runs = ContrastiveConfig(epochs=1, batch_size=4, lr=3e-3), []
    memory = spec.load()
    sizes = _read_sizes(monkeypatch)
    disk = spec.load(tmp_path / "cache")
    for name, d in (("memory", memory), ("disk", disk)):
        torch.manual_seed(0)
        backbone = VGG3D(input_size=16, classifier_hidden=8)
        runs.append((train_contrastive(backbone, d["train_x"], d["val_x"], config, tmp_path / name, progress=False).history, backbone.state_dict()))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0])                                   # the same losses, bit for bit
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())                # and the same weights
    assert len(disk["train_x"]) == 72 and sizes and max(sizes) <= 16                        # never the whole set in one read (hashes: 16 rows)
    assert sizes.count(config.batch_size) >= 72 // config.batch_size                         # training batches read as they are used


def test_validation_loss_is_a_function_of_the_weights_alone(tmp_path, one_thread):
    """The recorded validation loss of the kept epoch is recovered from its weights alone: the running statistics a training
    pass leaves are replaced by the re-estimate over fixed views of the training cubes before validating."""
    d = PretrainingSet(GeneratorConfig(cube_size=16, voxel_nm=40.0, n_bboxes=4, axons_per_bbox=4, synapses_per_axon=2), 3, 0, 1.0, 1).load()
    config = ContrastiveConfig(epochs=1, batch_size=4, lr=3e-3)
    torch.manual_seed(0)
    result = train_contrastive(VGG3D(input_size=16, classifier_hidden=8), d["train_x"], d["val_x"], config, tmp_path, progress=False)
    net = load_weights(ContrastiveVGG(VGG3D(input_size=16, classifier_hidden=8), config.proj_dim, config.stage_layer), result.best_checkpoint)
    recorded = result.history.set_index("epoch").loc[result.best_epoch, "val_loss"]
    with torch.no_grad(): net.train()(d["train_x"][:8] * 0.5)                       # running averages moved, weights untouched
    assert contrastive_validation(net, d["val_x"], config)["val_loss"] != pytest.approx(recorded, rel=1e-4)
    settled = reestimate_batchnorm(net, d["train_x"], config.batch_size, aug=Augmentation(), bf16=config.bf16)
    assert contrastive_validation(settled, d["val_x"], config)["val_loss"] == pytest.approx(recorded, rel=1e-6)


def test_batchnorm_reestimation_and_features_from_the_cache_equal_those_from_tensors(tmp_path):
    spec = PretrainingSet(TINY, 5, 0, 1.0, 1)
    memory, disk = spec.load(), spec.load(tmp_path)
    nets = []
    for d in (memory, disk):
        torch.manual_seed(1)
        nets.append(reestimate_batchnorm(VGG3D(input_size=16, classifier_hidden=8), d["train_x"], batch_size=4))
    assert all(torch.equal(v, nets[1].state_dict()[k]) for k, v in nets[0].state_dict().items())
    a, b = (network_features(nets[0], d["val_x"], [20, 33], batch_size=4) for d in (memory, disk))
    assert all(np.array_equal(a[n], b[n]) for n in (20, 33))
