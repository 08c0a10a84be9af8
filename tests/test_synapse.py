"""Synapse study: VGG3D layout, stage extraction, checkpoints, Grad-CAM, clustering and the CLI, against independent oracles."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch import nn

from project_lib.synapse.analysis import (dummy_head_target, grad_cam, localisation_auc, presynapse_consistency,
                                          run_clustering_analysis)
from project_lib.synapse.data import GeneratorConfig, SyntheticSynapses
from project_lib.synapse.model import (VGG3D, ExtractionConfig, ProxyTrainingConfig, VGG3DStageExtractor, cubes_to_input,
                                       extract_features, extract_stage_specific_features, layer_table, load_checkpoint,
                                       proxy_targets, train_proxy)

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
    # stage 20 is a raw convolution output: pre-BatchNorm, pre-ReLU, so it can be negative; standard is post-ReLU
    assert (standard.filter(like="feat_").to_numpy() >= 0).all()


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


def test_grad_cam_localises_what_the_head_reads():
    # every convolution copies channel 0 forward, so the pooled output the head reads is the bright blob of the input:
    # the map at layer 0 must sit on the blob (hand-made network, dummy head)
    model = VGG3D(input_size=16, fmaps=2, n_convolutions=(1, 1, 1, 1), classifier_hidden=4).eval()
    with torch.no_grad():
        for prm in model.parameters(): prm.zero_()
        for m in model.features:
            if isinstance(m, nn.BatchNorm3d): m.weight.fill_(1.0); m.running_var.fill_(1.0 - m.eps); m.running_mean.zero_()
            if isinstance(m, nn.Conv3d): m.weight[0, 0, 1, 1, 1] = 1.0
    x = torch.zeros(1, 1, 16, 16, 16); x[0, 0, 2:6, 2:6, 2:6] = 1.0
    cams = grad_cam(model, x, [0, 4], target=dummy_head_target)
    mask = x[0, 0].numpy() > 0
    assert localisation_auc(cams[0][0], mask) == pytest.approx(1.0)
    assert cams[0][0][mask].min() == pytest.approx(1.0) and cams[0][0][~mask].max() < 1.0


def test_localisation_auc_is_scikit_learns():
    rng = np.random.default_rng(0)
    cam, mask = rng.random((8, 8, 8)), rng.random((8, 8, 8)) > 0.7
    assert localisation_auc(cam, mask) == pytest.approx(roc_auc_score(mask.ravel(), cam.ravel()))
    with pytest.raises(ValueError, match="differ in shape"):
        localisation_auc(cam, mask[:4])


def _planted(n_per=25, k=4, d=6, shift=6.0, seed=0):
    rng = np.random.default_rng(seed)
    cls = np.repeat(np.arange(k), n_per)
    x = rng.normal(size=(len(cls), d)) + shift * np.eye(k, d)[cls]
    df = pd.DataFrame(x * np.array([1, 100, 0.01, 1, 10, 1]), columns=[f"feat_{i + 1}" for i in range(d)])
    df["synapse_class"] = cls
    df["bbox"] = rng.integers(0, 5, len(cls))                         # independent of the class
    df["axon"] = np.arange(len(cls)) // 5
    return df


def test_clustering_metrics_match_scikit_learn_on_planted_clusters(tmp_path):
    df = _planted()
    out, metrics = run_clustering_analysis(df, tmp_path, n_clusters=4, seed=0, embeddings=False)
    z = StandardScaler().fit_transform(df.filter(like="feat_").to_numpy())
    labels = KMeans(4, n_init=10, random_state=0).fit_predict(z)
    assert metrics["ari_class"] == pytest.approx(adjusted_rand_score(df.synapse_class, labels))
    assert metrics["nmi_class"] == pytest.approx(normalized_mutual_info_score(df.synapse_class, labels))
    assert metrics["ari_class"] > 0.9
    assert abs(metrics["ari_bbox"]) < 0.05                             # negative control
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


def test_proxy_training_learns_and_is_deterministic():
    data = SyntheticSynapses(TINY, seed=2)
    from project_lib.synapse.data import prepare_cube
    x = cubes_to_input([prepare_cube(data[i]) for i in range(len(data))])
    y, _, _ = proxy_targets(data.metadata())
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = VGG3D(input_size=16, classifier_hidden=16, dropout=0.0)
        runs.append(train_proxy(model, x, y, ProxyTrainingConfig(epochs=6, batch_size=4, lr=1e-3), progress=False))
    assert runs[0].loss.tolist() == runs[1].loss.tolist()
    assert runs[0].loss.iloc[-1] < runs[0].loss.iloc[0]
    with pytest.raises(ValueError, match="differ in length"):
        train_proxy(VGG3D(input_size=16, classifier_hidden=8), x, y[:-1], progress=False)


def test_cli_help_and_no_silent_random_weights():
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "project_lib.synapse", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--extraction_method" in run.stdout and "--layer_num" in run.stdout
    run = subprocess.run([sys.executable, "-m", "project_lib.synapse", "--extraction_method", "standard"], capture_output=True, text=True)
    assert run.returncode == 2 and "one of the arguments --checkpoint --random_init is required" in run.stderr
