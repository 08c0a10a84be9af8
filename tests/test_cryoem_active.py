"""Active learning for the picker: strategies against independent references (scikit-activeml, hand-computed cases, a
brute-force k-center), the theory of which strategies must coincide, the protocol's guards and its reproducibility."""
import ast
import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.spatial.distance import cdist
from skactiveml.pool._bald import batch_bald
from skactiveml.pool._core_set import k_greedy_center

from project_imports import project_imports
from project_lib.core import load_study_params
from project_lib.cryoem.active import (AcquisitionSettings, acquire, aggregate, bald, entropy, image_mean_score, k_center_greedy,
                                       least_confidence, margin, mc_dropout_probabilities, measure, scan_pool)
from project_lib.cryoem import al
from project_lib.cryoem.al import (ALStudyParams, al_units, check_disjoint, labelled_counts, load_al_run, micrograph_hashes, run_al_study,
                                   simulate_sets, train_al_units)
from project_lib.cryoem.data import Micrograph
from project_lib.cryoem.models import UNet


def _tiny():
    params = yaml.safe_load(Path("params.yaml").read_text())
    return {**params["cryoem_al"]["tiny"], **params["cryoem_al_analysis"]["tiny"]}


def _tiny_params(seeds=(3,), **changes) -> ALStudyParams:
    "The tiny profile on other seeds (the replay and the double cap follow them) with `changes`."
    return ALStudyParams(**{**_tiny(), "seeds": list(seeds), "replay_seeds": list(seeds), "double_cap_seeds": list(seeds), **changes})


@pytest.mark.parametrize("n_labelled", [1, 3])
def test_k_center_greedy_matches_scikit_activeml(n_labelled):
    rng = np.random.default_rng(n_labelled)
    for _ in range(10):
        x = rng.normal(size=(40, 6))
        labelled = rng.choice(40, n_labelled, replace=False)
        y = np.full(40, np.nan); y[labelled] = 0
        candidates = np.setdiff1d(np.arange(40), labelled)
        reference, _ = k_greedy_center(x, y, batch_size=7)
        assert k_center_greedy(x, labelled, candidates, 7) == reference.tolist()


def test_k_center_greedy_is_within_twice_the_optimal_radius():
    """Gonzalez's bound, against the optimum found by trying every subset (small data)."""
    from itertools import combinations
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.normal(size=(12, 2))
        radius = lambda centres: cdist(x, x[list(centres)]).min(axis=1).max()
        greedy = k_center_greedy(x, [0], range(1, 12), 3)
        best = min(radius([0, *c]) for c in combinations(range(1, 12), 3))
        assert radius([0, *greedy]) <= 2 * best + 1e-12


def test_bald_matches_scikit_activeml_and_hand_computed_values():
    rng = np.random.default_rng(1)
    samples = rng.uniform(0.02, 0.98, (6, 50))                       # 6 MC passes, 50 pixels as 50 samples
    probas = np.stack([1 - samples, samples], axis=-1)               # (passes, samples, classes)
    reference = batch_bald(probas.copy(), batch_size=1, random_state=0)[0]   # nats
    np.testing.assert_allclose(bald(samples) * math.log(2), reference, atol=1e-6)
    np.testing.assert_allclose(bald(np.array([[0.0, 0.5], [1.0, 0.5]])), [1.0, 0.0], atol=1e-12)


def test_per_pixel_scores_and_the_theory_of_which_strategies_coincide():
    p = np.random.default_rng(2).beta(0.4, 3.0, (30, 24, 24))
    np.testing.assert_allclose(least_confidence([0.1, 0.5, 0.8]), [0.1, 0.5, 0.2])
    np.testing.assert_allclose(entropy([0.5, 0.0]), [1.0, 0.0])
    for how in ("mean", "top_k"):
        lc, mg, en = (aggregate(f(p), how, 0.05) for f in (least_confidence, margin, entropy))
        assert np.array_equal(np.argsort(-lc, kind="stable"), np.argsort(-mg, kind="stable"))   # margin = 2 LC: same ranking
        assert not np.array_equal(np.argsort(-lc), np.argsort(-en))                             # entropy is not affine in LC
    orders = {tuple(np.argsort(-image_mean_score(p, s), kind="stable")) for s in ("least_confidence", "entropy", "margin")}
    assert len(orders) == 1                                                                     # the original's collapse


class _Constant(torch.nn.Module):
    """Logits fixed per micrograph (keyed by the image's constant value); a 1-channel 'bottleneck' for the hook."""
    def __init__(self, maps, embeddings):
        super().__init__()
        self.maps, self.embeddings = maps, embeddings
        self.encoder = torch.nn.ModuleList([torch.nn.Identity()])

    def forward(self, x):
        ids = x[:, 0, 0, 0].long()
        self.encoder[-1](self.embeddings[ids][:, :, None, None].expand(-1, -1, 2, 2))
        return torch.logit(self.maps[ids][:, None].clamp(1e-6, 1 - 1e-6))


def test_strategies_choose_different_micrographs_where_theory_says_they_must():
    pool = [Micrograph(np.full((16, 16), i, np.float32), np.zeros((0, 2)), 4.0, {}) for i in range(4)]
    half = np.where(np.arange(256).reshape(16, 16) % 2 == 0, 0.5, 0.0)          # mean LC 0.25, mean entropy 0.5
    maps = torch.tensor(np.stack([np.zeros((16, 16)), half, np.full((16, 16), 0.2), np.zeros((16, 16))]))  # 0.2: LC 0.2, entropy 0.72
    model = _Constant(maps, torch.tensor([[0.0], [1.0], [2.0], [10.0]]))
    chosen = {s: acquire(s, model, pool, [0], 1, np.random.default_rng(0)) for s in ("least_confidence", "margin", "entropy", "diversity")}
    assert chosen == {"least_confidence": [1], "margin": [1], "entropy": [2], "diversity": [3]}


def test_hook_embeddings_equal_a_manual_bottleneck_forward():
    torch.manual_seed(0)
    net = UNet(width=0.125, dropout=0.2).eval()
    mics = [Micrograph(np.random.default_rng(i).normal(size=(48, 48)).astype(np.float32), np.zeros((0, 2)), 5.0, {}) for i in range(3)]
    scan = scan_pool(net, mics, AcquisitionSettings(batch_size=2))
    h = torch.from_numpy(np.stack([m.image for m in mics]))[:, None]
    with torch.no_grad():
        for i, block in enumerate(net.encoder):
            h = block(h if i == 0 else net.pool(h))
    np.testing.assert_allclose(scan["embedding"], h.mean(dim=(2, 3)).numpy(), atol=1e-5)


def test_mc_dropout_is_seeded_and_needs_dropout():
    x = torch.randn(1, 1, 32, 32)
    net = UNet(width=0.0625, dropout=0.5)
    a, b = mc_dropout_probabilities(net, x, 3, seed=4), mc_dropout_probabilities(net, x, 3, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[1])
    with pytest.raises(ValueError, match="dropout > 0"):
        mc_dropout_probabilities(UNet(width=0.0625), x, 3, seed=4)


class _Untouchable(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the network ran: the error should have come first")


@pytest.mark.parametrize("change, message", [
    ({"labelled_fractions": [0.2, 0.2]}, "query size 0"),
    ({"labelled_fractions": [0.2, 1.3]}, r"\(0, 1\]"),
    ({"strategies": ["random", "badge"]}, "unknown strategy"),
    ({"pool_size": 2}, "smaller than a query"),
    ({"acquisition": {"mc_samples": 1}}, "mc_samples"),
])
def test_bad_configuration_is_refused_before_anything_runs(change, message, tmp_path):
    params = {**_tiny(), **change}
    Path(tmp_path / "params.yaml").write_text(yaml.safe_dump({"cryoem_al": {"tiny": params}}))   # one group: the schema is one dataclass
    with pytest.raises(ValueError, match=message):
        load_study_params("cryoem_al", ALStudyParams, "tiny", tmp_path / "params.yaml")
    pool = [Micrograph(np.zeros((16, 16), np.float32), np.zeros((0, 2)), 4.0, {}) for _ in range(3)]
    with pytest.raises(ValueError, match="query_size"):
        acquire("entropy", _Untouchable(), pool, [0], 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="query_size"):
        acquire("entropy", _Untouchable(), pool, [0], 3, np.random.default_rng(0))


def test_labelled_counts():
    assert labelled_counts(80, [0.1, 0.2, 0.3, 0.5]) == [8, 16, 24, 40]
    assert labelled_counts(5172, [0.1, 0.2]) == [517, 1034]


def test_measure_sees_an_allocation_of_known_size():
    def allocate():
        a = np.ones(200 * 2**20 // 8)
        return a.sum()
    _, seconds, mb = measure(allocate)
    assert seconds > 0 and 180 <= mb < 500


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    p = _tiny_params(strategies=["random", "entropy", "diversity", "bald", "particle_entropy"])
    root = tmp_path_factory.mktemp("a")
    return p, run_al_study(p, root), run_al_study(p, tmp_path_factory.mktemp("b")), root


def test_same_seed_gives_same_selections_and_metrics(tiny_runs):
    _, a, b, _ = tiny_runs
    cols = ["strategy", "round", "selected", "labelled", "test_particle_f1", "test_particle_auprc", "val_particle_f1", "test_pixel_roc_auc"]
    assert a.rounds[cols].to_dict("records") == b.rounds[cols].to_dict("records")
    assert a.replay.test_particle_f1.tolist() == b.replay.test_particle_f1.tolist()


def test_selected_batches_never_hold_validation_or_test_micrographs(tiny_runs):
    p, a, _, _ = tiny_runs
    held_out = set(micrograph_hashes([*a.sets["val"], *a.sets["test"]]))
    later = a.rounds[a.rounds["round"] >= 1]
    assert len(later) == len(p.strategies) * (len(p.labelled_fractions) - 1)
    for r in later.itertuples():
        assert not set(micrograph_hashes(a.sets["pool"].subset(r.selected))) & held_out
        assert set(r.selected) <= set(r.labelled) and r.n_labelled == len(r.labelled)
    with pytest.raises(ValueError, match="test micrographs"):
        check_disjoint([a.sets["test"][0]], {"test": a.sets["test"]})
    # every strategy's round 0 trained on the same data; every run on one budget and one validation set
    assert a.rounds[a.rounds["round"] == 0].train_hash.nunique() == 1
    assert a.rounds.budget_hash.nunique() == 1 and a.rounds.val_hash.nunique() == 1


def test_evaluation_refuses_when_the_trainings_are_missing(tmp_path):
    p = _tiny_params(strategies=["random", "entropy"])
    with pytest.raises(FileNotFoundError, match="not trained with this configuration.*run the training stage"):
        load_al_run(p, simulate_sets(p), tmp_path / "runs")


def _no_training(*args, **kwargs):
    raise AssertionError("a finished unit was trained again")


def test_finished_units_are_reused_and_changed_ones_retrained(tiny_runs, tmp_path, monkeypatch):
    p, a, _, root = tiny_runs
    runs = shutil.copytree(root, tmp_path / "runs")
    sets = simulate_sets(p)
    first, then = al_units(p, sets, runs)
    assert [u.key for u in first] == ["s3/round-0", "s3/full-pool", "s3/full-pool-double-cap", "s3/replay-asrecorded", "s3/replay-control"]
    assert [u.key for u in then] == [f"s3/{s}" for s in p.strategies]
    with monkeypatch.context() as m:                     # a second run of the training stage trains nothing
        m.setattr(al, "train", _no_training)
        records = train_al_units(p, sets, runs)
        assert load_al_run(p, sets, runs).rounds.test_particle_f1.tolist() == a.rounds.test_particle_f1.tolist()
    assert records["s3/entropy"]["rounds"][0]["selected"] == a.rounds.query("strategy == 'entropy' and round == 1").selected.iloc[0]
    # another acquisition setting changes the chains only: they are retrained, round 0, the full pool and the replay are reused
    changed = dataclasses.replace(p, acquisition={**p.acquisition, "mc_samples": 4})
    with pytest.raises(FileNotFoundError, match="5 training unit"):
        load_al_run(changed, sets, runs)
    stamps = {u.key: (runs / u.key / "unit.json").stat().st_mtime_ns for u in first + then}
    trained = []
    real_train = al.train
    monkeypatch.setattr(al, "train", lambda config, train_set, *args, **kwargs: trained.append(len(train_set)) or real_train(config, train_set, *args, **kwargs))
    train_al_units(changed, sets, runs)
    assert len(trained) == len(p.strategies) * (len(p.labelled_fractions) - 1)
    after = {u.key: (runs / u.key / "unit.json").stat().st_mtime_ns for u in first + then}
    assert {k for k in stamps if stamps[k] != after[k]} == {f"s3/{s}" for s in p.strategies}
    assert load_al_run(changed, sets, runs).rounds.query("round == 0").test_particle_f1.tolist() == a.rounds.query("round == 0").test_particle_f1.tolist()


def test_only_what_is_read_again_stays_on_disk_and_a_pruned_chain_retrains_the_same(tmp_path):
    """A chain or replay of several rounds keeps its last round's folder only; other trainings keep only their best weights and a
    record (last.pt without weights); a chain killed after pruning (no unit.json) retrains to the same record."""
    import json
    p = _tiny_params(strategies=["random", "entropy"], labelled_fractions=[0.2, 0.4, 0.6], replay_fractions=[0.2, 0.4, 0.6])
    root, sets = tmp_path / "runs", simulate_sets(p)
    train_al_units(p, sets, root)
    for unit in ["s3/entropy", "s3/replay-asrecorded", "s3/replay-control"]:
        assert len([d for d in (root / unit).iterdir() if d.is_dir()]) == 1, unit   # several rounds trained, one folder left
    state = lambda path: torch.load(path, weights_only=True)
    round0 = next(d for d in (root / "s3/round-0").iterdir() if d.is_dir())
    assert "model" not in state(round0 / "last.pt") and "model" in state(round0 / "best.pt")   # nothing warm-starts from round 0 any more
    chain = next(d for d in (root / "s3/entropy").iterdir() if d.is_dir())
    assert chain.name.startswith("s3-n6-")                                          # the last round's (6 of 10 labelled)
    assert sorted(state(chain / "last.pt")) == ["best_score", "config", "epoch", "history", "init_hash", "stopped_early", "train_hash", "train_time_s", "val_hash"]
    first = json.loads((root / "s3/entropy/unit.json").read_text())["record"]
    (root / "s3/entropy/unit.json").unlink()
    again = json.loads(json.dumps(train_al_units(p, sets, root)["s3/entropy"]))
    untimed = lambda record: [{**{k: v for k, v in r.items() if k not in ("acquisition_s", "acquisition_peak_mb", "summary")},
                               "summary": [kv for kv in r["summary"] if kv[0] != "train_time_s"]} for r in record["rounds"]]
    assert len(first["rounds"]) == 2 and untimed(again) == untimed(first)


def test_the_training_identity_and_stage_cover_exactly_the_code_the_trainings_import():
    imported = project_imports("cryoem.al") - {"core"}
    assert imported == set(al._TRAINING_CODE) and "cryoem.al_analysis" not in imported and "report" not in imported
    deps = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]["train_cryoem_al"]["deps"]
    assert {d for d in deps if d.startswith("project_lib/")} == {f"project_lib/{m.replace('.', '/')}.py" for m in imported | {"core", "__init__"}}   # __init__: the portable numerics


def test_the_sets_are_lazy_and_the_list_they_replaced():
    """`simulate_sets` against `simulate_dataset` cut by position: same hashes, images, masks and metadata; a unit ships
    the sets without their images."""
    import pickle
    from project_lib.cryoem.data import MicrographConfig
    from project_lib.cryoem.train import SimulatedMicrographs, data_hash, simulate_dataset
    p = ALStudyParams(**_tiny())
    sets = simulate_sets(p)
    listed = simulate_dataset(MicrographConfig(**p.micrograph), p.pool_size + p.n_val + p.n_test, p.data_seed)
    expected = {"pool": listed[:p.pool_size], "val": listed[p.pool_size:p.pool_size + p.n_val], "test": listed[p.pool_size + p.n_val:]}
    for k, v in expected.items():
        assert isinstance(sets[k], SimulatedMicrographs) and data_hash(sets[k]) == data_hash(v)
        assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.metadata == b.metadata for a, b in zip(sets[k], v, strict=True))
        assert micrograph_hashes(sets[k]) == [data_hash([m]) for m in v]
    first, _ = al_units(p, sets, "runs")
    assert len(pickle.dumps(first[0])) < sum(m.image.nbytes for m in listed) / 4


def test_bad_validation_settings_are_refused():
    with pytest.raises(ValueError, match="val_every must be >= 1"):
        ALStudyParams(**{**_tiny(), "training": {**_tiny()["training"], "val_every": 0}})
    with pytest.raises(ValueError, match=r"val_subset \(4\) must not exceed n_val \(3\)"):
        ALStudyParams(**{**_tiny(), "training": {**_tiny()["training"], "val_subset": 4}})


@pytest.mark.parametrize("change, message", [
    ({"seeds": [-1]}, "seeds must be >= 0"),
    ({"strategies": ["random"]}, "at least one strategy to compare"),
    ({"targets": []}, r"targets = \[\] is not a valid list"),
    ({"bootstrap_resamples": 0}, "bootstrap_resamples must be >= 100"),
    ({"replay_lr": -1.0}, "replay_lr > 0"),
    ({"n_test": 1}, "n_test >= 2"),
    ({"acquisition": {"mc_samples": "8"}}, "mc_samples must be an integer"),
    ({"pool_size": 80.5}, "pool_size = 80.5 is not a valid int"),
    ({"strategies": ["random", "least_confidence", "margin"]}, "one training serves both"),
    ({"training": {**_tiny()["training"], "patience": 0}}, "patience must be >= 1"),
    ({"replay_seeds": [5]}, "replay_seeds must be distinct seeds among"),
    ({"double_cap_seeds": [0, 0]}, "double_cap_seeds must be distinct seeds among"),
    ({"replay_initial_epochs": 0}, "replay_initial_epochs and replay_epochs must be >= 1"),
    ({"pilot": {"var_seed": 0.001, "room": 0.05}}, r"pilot lacks \['source', 'var_micrograph', 'var_residual'\]"),
    ({"pilot": {"var_seed": -0.001, "var_micrograph": 0, "var_residual": 0, "room": 0.05, "source": "x"}}, "must be numbers >= 0"),
])
def test_bad_study_settings_of_the_third_review_are_refused_when_read(change, message, tmp_path):
    params = {**_tiny(), **change}
    Path(tmp_path / "params.yaml").write_text(yaml.safe_dump({"cryoem_al": {"tiny": params}}))
    with pytest.raises(ValueError, match=message):
        load_study_params("cryoem_al", ALStudyParams, "tiny", tmp_path / "params.yaml")


def test_k_center_greedy_refuses_repeated_candidates_and_broken_embeddings():
    x = np.random.default_rng(0).normal(size=(6, 3))
    with pytest.raises(ValueError, match="candidates must not repeat"):
        k_center_greedy(x, [0], [1, 2, 2, 3], 2)
    x[4] = np.nan                                                   # an all-NaN micrograph's embedding
    with pytest.raises(ValueError, match=r"embeddings of micrographs \[4\] are not finite"):
        k_center_greedy(x, [0], [1, 2, 3, 4], 2)
    assert sorted(k_center_greedy(x, [0], [1, 2, 3], 3)) == [1, 2, 3]   # the others still work


def test_integers_are_refused_as_floats_when_built_directly():
    with pytest.raises(ValueError, match="pool_size must be an integer, got 80.5"):
        ALStudyParams(**{**_tiny(), "pool_size": 80.5})
    with pytest.raises(ValueError, match="seeds must be an integer, got 1.5"):
        ALStudyParams(**{**_tiny(), "seeds": [0, 1.5]})


@pytest.mark.parametrize("broken", ["nan", "constant"])
def test_broken_micrographs_are_refused_at_the_pools_entry(broken):
    rng = np.random.default_rng(0)
    mics = [Micrograph(rng.normal(size=(16, 16)).astype(np.float32), np.zeros((0, 2)), 4.0, {}) for _ in range(4)]
    al.check_images(mics, "pool")
    image = np.full((16, 16), np.nan if broken == "nan" else 0.3, np.float32)
    mics[2] = Micrograph(image, np.zeros((0, 2)), 4.0, {})
    with pytest.raises(ValueError, match=r"pool micrographs \[2\] hold NaN or Inf or are constant"):
        al.check_images(mics, "pool")


def test_the_replay_follows_the_recorded_recipe(tiny_runs):
    """Weights reset every round (no warm start), Adam at the constant replay rate, no augmentation, whole micrographs, epochs over the
    labelled set (20 then 10 in the original), no early stopping, the last checkpoint at threshold 0.5; the control trains as many steps."""
    p, a, _, _ = tiny_runs
    config = p.replay_config(3, 7)
    assert (config.lr, config.lr_schedule, config.augment, config.crop_px, config.samples_per_epoch, config.epochs, config.patience) == \
        (p.replay_lr, "constant", False, 0, 0, 7, 0)
    replay = a.replay.sort_values(["arm", "round"])
    counts = labelled_counts(p.pool_size, p.replay_fractions)
    recorded = replay[replay.arm == "as recorded"]
    epochs = [p.replay_initial_epochs] + [p.replay_epochs] * (len(counts) - 1)
    assert recorded.n_labelled.tolist() == counts and recorded.epochs.tolist() == epochs
    assert recorded.steps.tolist() == [e * math.ceil(n / p.train_config(3).batch_size) for e, n in zip(epochs, counts)]
    control = replay[replay.arm == "control"]
    assert control.steps.tolist() == recorded.steps.tolist() and set(control.n_labelled) == {counts[0]}
    assert set(replay.threshold) == {0.5} and (replay.epochs_trained == replay.epochs).all()   # no early stopping, threshold fixed
    assert (replay.best_epoch <= replay.epochs).all() and "val_particle_f1" in replay   # what the original reported: validation at 0.5


def test_particle_entropy_ranks_by_the_uncertainty_of_predicted_particles():
    """Micrograph 1: one large confident particle and a wide faintly uncertain background (high mean entropy); micrograph 2: two small
    uncertain particles on a certain background. Per-pixel entropy chooses 1, the annotator's unit chooses 2."""
    pool = [Micrograph(np.full((16, 16), i, np.float32), np.zeros((0, 2)), 4.0, {}) for i in range(3)]
    m1 = np.full((16, 16), 0.2); m1[:6, :6] = 0.99
    m2 = np.full((16, 16), 0.001); m2[0, 0] = m2[10, 10] = 0.55
    model = _Constant(torch.tensor(np.stack([np.zeros((16, 16)), m1, m2])), torch.tensor([[0.0], [1.0], [2.0]]))
    assert acquire("entropy", model, pool, [0], 1, np.random.default_rng(0)) == [1]
    assert acquire("particle_entropy", model, pool, [0], 1, np.random.default_rng(0)) == [2]


def test_bald_batches_do_not_depend_on_the_mask_seed_on_a_trained_network(tmp_path):
    """With dropout before the head and 32 passes, two mask seeds choose the same batch from a tiny network trained for 160 steps."""
    from project_lib.cryoem.al_analysis import bald_stability
    p = _tiny_params(training={**_tiny()["training"], "epochs": 20, "samples_per_epoch": 32, "patience": 20},
                     acquisition={**_tiny()["acquisition"], "mc_samples": 32})
    sets = simulate_sets(p)
    _, _, checkpoint = al.train_round(p.train_config(3), sets, list(range(p.pool_size)), tmp_path / "net")
    table = bald_stability(al.ALRun(p, sets, None, None, None, None, {(3, "initial"): checkpoint}), [3])
    assert table.jaccard.iloc[0] >= 0.9 and table.spearman.iloc[0] > 0.9
    assert 0 < table.mi_over_entropy.iloc[0] < 1
