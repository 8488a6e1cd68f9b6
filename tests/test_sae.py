"""SAE learner: kinds, training invariants, planted recovery, save/load, checkpoints, sweeps, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _planted import planted, recovered

import vitatlas
from vitatlas import ActivationStore, VitatlasError
from vitatlas.evaluation.metrics import reconstruction_metrics
from vitatlas.learners.sae import DEFAULT_L1, SAE
from vitatlas.learners.sae.train import SAESweep, default_lr, default_rows, training_budget


@pytest.fixture(scope="module")
def small():
    X, _ = planted(n=2048, d=32, m=64, k=3, seed=1)
    return X


def fast(kind="topk", **kw):
    base = dict(n_latents=96, epochs=2, batch_size=256, seed=3)
    if kind in ("topk", "batchtopk", "matryoshka"):
        base["k"] = 3
    base.update(kw)
    return SAE(kind=kind, **base)


# ---- recovery and invariants ------------------------------------------------------------------------

def test_topk_recovers_planted_atoms():
    # d=64, 256 planted unit atoms, k=4 non-negative codes, noise 0.01; 2x overcomplete SAE, 640 steps.
    # Measured over data/model seeds 0-3: 0.969-0.992 of the atoms at |cos| >= 0.99.
    X, true = planted(n=8192, d=64, m=256, k=4, noise=0.01, seed=0)
    sae = SAE(kind="topk", n_latents=512, k=4, epochs=20, batch_size=256, seed=0).fit(X, progress=False)
    rate = recovered(sae.atoms.numpy(), true, 0.99)
    assert rate >= 0.95, f"recovered {rate:.3f} of planted atoms at |cos| >= 0.99"
    m = reconstruction_metrics(sae, X)
    assert m["explained_variance"] > 0.85 and m["l0"] == pytest.approx(4.0)


def test_decoder_rows_stay_unit_norm_during_training(small):
    norms = []

    def check(step, metrics):
        norms.append(float((sae.params["W_dec"].detach().norm(dim=1) - 1).abs().max()))

    for kind in ("topk", "relu", "jumprelu"):
        sae = fast(kind, epochs=1)
        sae.fit(small, progress=False, callback=check)
        assert torch.allclose(sae.atoms.norm(dim=1), torch.ones(96), atol=1e-5)
    assert norms and max(norms) < 1e-5


def test_topk_codes_have_exactly_k_nonzeros(small):
    sae = fast("topk", k=5).fit(small, progress=False)
    codes = sae.encode(small)
    assert ((codes != 0).sum(1) == 5).all()
    sparse = sae.encode_sparse(small[:10])
    assert (sparse.indices >= 0).sum(1).tolist() == [5] * 10


def test_batchtopk_l0_is_k_in_training_and_close_at_inference(small):
    seen = []
    sae = fast("batchtopk", k=4, epochs=12)
    sae.fit(small, progress=False, callback=lambda step, m: seen.append(m[sae.name]["l0"]))
    assert all(v == pytest.approx(4.0) for v in seen)  # exactly B·k codes per batch while training
    l0 = float((sae.encode(small) != 0).sum(1).mean())
    assert 3.0 <= l0 <= 5.0, l0  # learned global threshold at inference
    assert float(sae.params["threshold"]) > 0


def test_every_kind_learns_something(small):
    for kind in ("relu", "topk", "batchtopk", "jumprelu", "matryoshka"):
        sae = fast(kind, epochs=20)
        m = reconstruction_metrics(sae.fit(small, progress=False), small)
        assert m["explained_variance"] > 0.5, (kind, m)
        assert 0 < m["l0"] < 96, (kind, m)


def test_matryoshka_first_group_reconstructs_alone(small):
    groups = [12, 48, 96]
    mat = fast("matryoshka", groups=groups, epochs=30).fit(small, progress=False)
    plain = fast("batchtopk", epochs=30).fit(small, progress=False)

    def prefix_ev(sae):
        codes = sae.encode(small)
        codes[:, groups[0]:] = 0
        err = small - sae.decode(codes)
        return 1 - (err ** 2).sum() / ((small - small.mean(0)) ** 2).sum()

    assert prefix_ev(mat) > prefix_ev(plain) + 0.05  # measured 0.25 vs 0.12


def test_jumprelu_thresholds_learn_and_l1_controls_l0(small):
    lo = fast("jumprelu", l1=1e-3, epochs=3).fit(small, progress=False)
    hi = fast("jumprelu", l1=5e-2, epochs=3).fit(small, progress=False)
    assert not torch.allclose(lo.params["log_threshold"], torch.full((96,), np.log(0.1), dtype=torch.float32))
    assert reconstruction_metrics(hi, small)["l0"] < reconstruction_metrics(lo, small)["l0"]


def test_relu_without_l1_uses_default_and_l1_controls_l0(small):
    sae = SAE(kind="relu", n_latents=96)
    assert sae.l1 == DEFAULT_L1["relu"] and SAE(kind="jumprelu", n_latents=8).l1 == DEFAULT_L1["jumprelu"]
    weak = fast("relu", l1=0.02, epochs=3).fit(small, progress=False)
    strong = fast("relu", l1=0.5, epochs=3).fit(small, progress=False)
    assert reconstruction_metrics(strong, small)["l0"] < reconstruction_metrics(weak, small)["l0"]


def test_units_are_the_datas_own(small):
    # scaled and shifted data: reconstruct in original units, codes·atoms + bias == reconstruction
    X = small * 40.0 + 3.0
    sae = fast("topk", epochs=3).fit(X, progress=False)
    codes = sae.encode(X)
    bias = (sae.params["b_dec"] / sae.params["scale"]).numpy()
    np.testing.assert_allclose(sae.reconstruct(X), codes @ sae.atoms.numpy() + bias, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(sae.decode(codes), sae.reconstruct(X), rtol=1e-5, atol=1e-4)
    ev_scaled = reconstruction_metrics(sae, X)["explained_variance"]
    ev_orig = reconstruction_metrics(fast("topk", epochs=3).fit(small, progress=False), small)["explained_variance"]
    assert ev_scaled == pytest.approx(ev_orig, abs=0.02)  # scale-free training
    assert abs(sae.fit_info["train_metrics"]["explained_variance"] - ev_scaled) < 0.1
    t = torch.from_numpy(X[:5])
    assert isinstance(sae.encode(t), torch.Tensor) and isinstance(sae.encode(X[:5]), np.ndarray)


# ---- initialisation and dead latents -------------------------------------------------------------------

def test_data_directions_against_numpy():
    from vitatlas.learners.sae.model import data_directions

    rng = np.random.default_rng(2)
    random, rows, mean = rng.standard_normal((6, 5)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    rows[2] = mean  # no direction: stays random
    got = data_directions(torch.from_numpy(random), torch.from_numpy(rows), torch.from_numpy(mean)).numpy()
    want = random.copy()
    want[[0, 1, 3]] = rows[[0, 1, 3]] - mean
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    few = data_directions(torch.from_numpy(random), torch.zeros(0, 5, dtype=torch.float64), torch.from_numpy(mean))
    np.testing.assert_array_equal(few.numpy(), random)


def test_encoder_scale_is_the_least_squares_fit_of_the_initial_reconstruction():
    from vitatlas.learners.sae.model import SAEModule, encoder_scale

    X = torch.from_numpy(_subspace_problem(n=600)).double()
    mean = X.mean(0)
    for kw in (dict(kind="topk", k=4), dict(kind="relu")):
        cfg = SAE(n_latents=64, **kw).config
        m = SAEModule.initial(cfg, 48, mean, 1.0, seed=0, device="cpu", dtype=torch.float64, rows=X)
        w = m.W_dec.numpy()
        c = float(m.W_enc.norm(dim=1).mean())
        np.testing.assert_allclose(m.W_enc.numpy(), c * w, rtol=1e-12)  # the decoder transpose, scaled
        held = X[64:]  # the rows after the decoder's
        z = m.activate(m.pre_activations(held))  # the module's own activation at the start
        x_hat = (z @ m.W_dec).numpy()
        # reference: the scale s minimising ||xc - s * x1||^2, x1 the reconstruction with the unscaled encoder
        x1 = x_hat / c
        xc = (held - mean).numpy()
        s_ref = np.linalg.lstsq(x1.reshape(-1, 1), xc.reshape(-1), rcond=None)[0][0]
        assert c == pytest.approx(s_ref, rel=1e-9)
        assert 0 < c < 1  # the unscaled sum of winners near a row overshoots it
        assert encoder_scale(cfg, torch.from_numpy(w), held[:0], mean) == 1.0  # no rows: unscaled


def test_data_stats_and_init_rows(small):
    X = small[:1500] * 3.0 + 1.0
    mean, scale, rows = SAESweep._data_stats(X, 32, "cpu", torch.float32, seed=0, want_rows=2000)
    ref = X.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), ref.mean(0), rtol=1e-6, atol=1e-6)
    assert scale == pytest.approx(np.sqrt(32 / (ref ** 2).sum(1).mean()), rel=1e-6)
    # every row, once each, in the shuffled order (fewer rows than wanted: all of them)
    assert rows.shape == (1500, 32) and not np.array_equal(rows.numpy(), ref)
    np.testing.assert_array_equal(np.sort(rows.numpy(), axis=0), np.sort(ref.astype(np.float32), axis=0))
    _, _, first = SAESweep._data_stats(X, 32, "cpu", torch.float32, seed=0, want_rows=10)
    np.testing.assert_array_equal(first.numpy(), rows[:10].numpy())
    from vitatlas.learners.sae.model import SAEModule

    cfg = SAE(kind="topk", n_latents=64, k=3).config
    m = SAEModule.initial(cfg, 32, mean * scale, scale, seed=0, device="cpu", dtype=torch.float32, rows=rows * scale)
    want = (rows[:64] - mean).numpy()
    np.testing.assert_allclose(m.W_dec.numpy(), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    c = float(m.W_enc.norm(dim=1).mean())  # the encoder is the decoder, scaled (see the encoder_scale test)
    np.testing.assert_allclose(m.W_enc.numpy(), c * m.W_dec.numpy(), rtol=1e-5, atol=1e-7)


def _subspace_problem(n=4096, d=48, r=16, m=192, seed=0):
    """m planted atoms inside an r-dimensional subspace of R^d, plus an offset: like ViT tokens, whose variance
    sits in few directions. Random unit latents are mostly outside the subspace; many never win a top-k."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, r)))[0]
    Z, _ = planted(n=n, d=r, m=m, k=3, seed=seed)
    return (Z @ basis.T + 3.0 * basis[:, 0] + 0.01 * rng.standard_normal((n, d))).astype(np.float32)


def test_data_init_keeps_latents_alive_where_random_directions_leave_many_dead():
    X = _subspace_problem()
    opts = dict(kind="topk", n_latents=192, k=3, batch_size=256, seed=0, aux_relative=False)  # 128 steps
    old = SAE(**opts, init="random").fit(X, progress=False)  # the defaults before issue 19
    new = SAE(**opts, init="data").fit(X, progress=False)
    m_old, m_new = reconstruction_metrics(old, X), reconstruction_metrics(new, X)
    assert m_old["dead_fraction"] > 0.1  # a problem that kills latents: measured 0.172 dead
    assert m_new["dead_fraction"] <= 0.05, m_new["dead_fraction"]  # measured 0.000
    assert m_new["explained_variance"] > m_old["explained_variance"] + 0.03  # measured 0.761 against 0.680


# ---- save / load / checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu", "matryoshka", "relu"])
def test_save_load_round_trip(small, tmp_path, kind):
    sae = fast(kind, epochs=1).fit(small, progress=False)
    sae.save(tmp_path / "m")
    back = vitatlas.load(tmp_path / "m")
    assert isinstance(back, SAE) and back._config() == sae._config() and back.n_atoms == 96
    np.testing.assert_array_equal(back.encode(small[:64]), sae.encode(small[:64]))
    np.testing.assert_array_equal(back.reconstruct(small[:64]), sae.reconstruct(small[:64]))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["learner"] == "sae" and "train_metrics" in cfg["fit_info"]


@pytest.mark.parametrize("kind", ["batchtopk", "jumprelu"])
def test_resume_after_kill_equals_uninterrupted_run(small, tmp_path, kind):
    opts = dict(epochs=3, checkpoint_every=5, batch_size=200)  # 10 steps/epoch, 30 steps
    ref = fast(kind, **opts).fit(small, progress=False)

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 17:
            raise Killed

    with pytest.raises(Killed):
        fast(kind, **opts).fit(small, progress=False, checkpoint_dir=tmp_path / "ck", callback=kill)
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert state["step"] == 15 and not state["complete"]
    # how often it saves is not part of the checkpoint's identity (nor is the device: CPU -> GPU resumes)
    resumed = fast(kind, **dict(opts, checkpoint_every=7)).fit(small, progress=False, checkpoint_dir=tmp_path / "ck")
    assert (resumed.atoms - ref.atoms).abs().max() <= 1e-6
    for name in ref.params:
        torch.testing.assert_close(resumed.params[name], ref.params[name], rtol=0, atol=1e-6)
    assert resumed.fit_info["train_metrics"] == pytest.approx(ref.fit_info["train_metrics"])
    # a finished checkpoint is reused without training again
    again = fast(kind, **opts).fit(small, progress=False, checkpoint_dir=tmp_path / "ck",
                                          callback=lambda s, m: (_ for _ in ()).throw(AssertionError("trained")))
    torch.testing.assert_close(again.atoms, ref.atoms, rtol=0, atol=0)


def test_checkpoint_refuses_other_options_data_and_corruption(small, tmp_path):
    ck = tmp_path / "ck"
    fast("topk", epochs=1).fit(small, progress=False, checkpoint_dir=ck)
    with pytest.raises(VitatlasError, match="different SAE options"):
        fast("topk", epochs=1, k=4).fit(small, progress=False, checkpoint_dir=ck)
    with pytest.raises(VitatlasError, match="different data"):
        fast("topk", epochs=1).fit(small[::-1].copy(), progress=False, checkpoint_dir=ck)
    weights = next(ck.glob("state-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(VitatlasError, match="corrupt or truncated"):
        fast("topk", epochs=1).fit(small, progress=False, checkpoint_dir=ck)
    (ck / "state.json").write_text("{not json")
    with pytest.raises(VitatlasError, match="corrupt"):
        fast("topk", epochs=1).fit(small, progress=False, checkpoint_dir=ck)


def test_checkpoint_of_the_older_trainer_resumes_with_its_options_or_is_refused(small, tmp_path):
    # the trainer before the init / aux_relative options trained as init="random", aux_relative=False and
    # wrote checkpoints whose identity lacks both keys: made here by deleting them from a fresh checkpoint
    old = dict(init="random", aux_relative=False, epochs=2, checkpoint_every=4, batch_size=256)  # 16 steps
    ref = fast("topk", **old).fit(small, progress=False)

    def kill(step, metrics):
        if step == 6:
            raise KeyboardInterrupt

    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        fast("topk", **old).fit(small, progress=False, checkpoint_dir=ck, callback=kill)
    state = json.loads((ck / "state.json").read_text())
    for c in state["identity"]["configs"]:
        del c["init"], c["aux_relative"]
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(VitatlasError, match=r"older vitatlas.*pass init='random', aux_relative=False") as e:
        fast("topk", **dict(old, init="data")).fit(small, progress=False, checkpoint_dir=ck)
    assert "\n" not in str(e.value)
    resumed = fast("topk", **old).fit(small, progress=False, checkpoint_dir=ck)
    for name in ref.params:
        torch.testing.assert_close(resumed.params[name], ref.params[name], rtol=0, atol=0)


def test_runs_saved_before_the_new_options_report_how_they_were_trained():
    from pathlib import Path

    run = Path(__file__).parent / "data" / "legacy-runs" / "sae-topk"
    assert "init" not in json.loads((run / "config.json").read_text())["config"]
    sae = vitatlas.load(run)
    assert sae.optim.init == "random" and sae.config.activation.aux_relative is False
    assert SAE(**sae._config())._config() == sae._config()


def test_store_streaming_fit_and_jsonl_log(small, tmp_path):
    store = ActivationStore.from_array(tmp_path / "acts", small, dtype="float16", shard_bytes=20_000)
    assert len(store.shards) > 1
    sae = fast("topk", epochs=10, log_every=2).fit(store, progress=False, log_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "explained_variance", "l0", "dead_fraction", "step"} <= set(rows[0])
    assert any(r["event"] == "epoch_end" for r in rows)
    assert sae.fit_info["source"] == "store"
    assert reconstruction_metrics(sae, store)["explained_variance"] > 0.5


# ---- sweeps -------------------------------------------------------------------------------------------

def test_sweep_equals_separate_fits(small):
    def members():
        return [fast("topk", k=2), fast("topk", k=4, n_latents=64), fast("batchtopk", lr=1e-3),
                fast("relu", l1=0.02)]
    swept = SAESweep(members()).fit(small, progress=False)
    for s, alone in zip(swept, members()):
        alone.fit(small, progress=False)
        for name in alone.params:
            torch.testing.assert_close(s.params[name], alone.params[name], rtol=0, atol=0)


def test_sweep_resumes_after_kill(small, tmp_path):
    def members():
        return [fast("topk", k=2, checkpoint_every=4), fast("matryoshka", groups=[24, 96], checkpoint_every=4)]
    ref = SAESweep(members()).fit(small, progress=False)

    def kill(step, metrics):
        if step == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        SAESweep(members()).fit(small, progress=False, checkpoint_dir=tmp_path / "ck", callback=kill)
    resumed = SAESweep(members()).fit(small, progress=False, checkpoint_dir=tmp_path / "ck")
    for a, b in zip(resumed, ref):
        for name in b.params:
            torch.testing.assert_close(a.params[name], b.params[name], rtol=0, atol=0)


def test_float64_training(small):
    sae = fast("topk", dtype="float64", epochs=2).fit(small.astype(np.float64), progress=False)
    assert sae.atoms.dtype == torch.float64
    assert reconstruction_metrics(sae, small)["l0"] == pytest.approx(3.0)


def test_sweep_refuses_members_that_cannot_share_batches():
    with pytest.raises(VitatlasError, match="batch_size"):
        SAESweep([fast("topk"), fast("topk", batch_size=128)])
    with pytest.raises(VitatlasError, match="at least one"):
        SAESweep([])


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="nope", n_latents=8, k=2), "unknown SAE kind"),
    (dict(kind="topk", n_latents=8, k=8), "smaller than n_latents"),
    (dict(kind="topk", n_latents=8, k=0), "positive integer"),
    (dict(kind="topk", n_latents=8, k=-1), "positive integer"),
    (dict(kind="topk", n_latents=8), "needs k"),
    (dict(kind="topk", n_latents=8, k=2, l1=0.1), "l1 is not used"),
    (dict(kind="relu", n_latents=8, k=2), "k is not used"),
    (dict(kind="relu", n_latents=8, l1=-1.0), "l1 must be"),
    (dict(kind="topk", n_latents=0, k=2), "n_latents"),
    (dict(kind="topk", n_latents=8, k=2, dtype="int8"), "unknown dtype"),
    (dict(kind="topk", n_latents=8, k=2, batch_size=0), "batch_size"),
    (dict(kind="topk", n_latents=8, k=2, groups=[4, 8]), "groups is not used by a topk SAE"),
    (dict(kind="relu", n_latents=64, aux_coef="x"), "aux_coef is not used by a relu SAE"),
    (dict(kind="topk", n_latents=64, k=4, aux_coef="x"), "aux_coef must be a finite number >= 0, got 'x'"),
    (dict(kind="topk", n_latents=64, k=4, speed=3), "unknown SAE option 'speed'"),
    (dict(kind="topk", n_latents=64, k=4, lr=float("nan")), "lr must be"),
    (dict(kind="matryoshka", n_latents=8, k=2, groups=[4, 6]), "ending at n_latents"),
    (dict(kind="topk", n_latents=8, k=2, epochs=2, tokens=1000), "epochs or tokens, not both"),
    (dict(kind="topk", n_latents=8, k=2, tokens=0), "tokens"),
    (dict(kind="topk", n_latents=8, k=2, init="pca"), "init must be one of 'random', 'data', got 'pca'"),
    (dict(kind="relu", n_latents=8, aux_relative=True), "aux_relative is not used by a relu SAE"),
    (dict(kind="topk", n_latents=8, k=2, aux_relative=1), "aux_relative must be True or False"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(VitatlasError, match=match):
        SAE(**kwargs)


def test_bad_data(small):
    bad = small.copy()
    bad[5, 3] = np.nan
    with pytest.raises(VitatlasError, match="NaN or Inf"):
        fast().fit(bad, progress=False)
    bad[5, 3] = np.inf
    with pytest.raises(VitatlasError, match="NaN or Inf"):
        fast().fit(bad, progress=False)
    with pytest.raises(VitatlasError, match="empty"):
        fast().fit(np.zeros((0, 32), np.float32), progress=False)
    with pytest.raises(VitatlasError, match="2-D"):
        fast().fit(small[0], progress=False)
    with pytest.raises(VitatlasError, match="all zeros"):
        fast().fit(np.zeros((300, 32), np.float32), progress=False)
    sae = fast(epochs=1).fit(small, progress=False)
    with pytest.raises(VitatlasError, match="width"):
        sae.encode(small[:, :16])
    with pytest.raises(VitatlasError, match="not fitted"):
        fast().encode(small)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only error")
def test_cuda_unavailable_is_a_clear_error():
    # checked when the options are made, as for every learner
    with pytest.raises(VitatlasError, match="CUDA is not available"):
        fast(device="cuda")
    with pytest.raises(VitatlasError, match="unknown device"):
        fast(device="gpu!")


def test_k_at_least_d_is_allowed_for_saes():
    X, _ = planted(n=600, d=8, m=16, k=2, seed=4)
    sae = SAE(kind="topk", n_latents=32, k=10, epochs=1, batch_size=100).fit(X, progress=False)
    assert ((sae.encode(X) != 0).sum(1) <= 10).all()


def test_defaults():
    assert default_lr(512) == pytest.approx(4e-3) and default_lr(16384) == pytest.approx(8e-4)
    # the default budget: 3 passes, at least 1M rows, at most 8 passes
    assert default_rows(384_000) == 1_152_000 and default_rows(36_864) == 8 * 36_864
    assert default_rows(200_000) == 1_000_000 and default_rows(10_000_000) == 30_000_000
    tc = SAE(kind="topk", n_latents=64, k=4).train_config
    b = training_budget(tc, 384_000)
    assert (b.steps, b.steps_per_epoch, b.epochs) == (1125, 375, 3) and b.rows == 1_152_000
    assert training_budget(SAE(kind="topk", n_latents=64, k=4, epochs=2).train_config, 5000).steps == 8
    assert training_budget(SAE(kind="topk", n_latents=64, k=4, tokens=10_240).train_config, 5000).steps == 10
    assert training_budget(SAE(kind="topk", n_latents=64, k=4, batch_size=800).train_config, 500).rows == 8 * 500
    small = training_budget(tc, 30_000)  # 8 whole passes of 29 full batches, not a 9th pass of 2 steps
    assert (small.steps, small.epochs) == (8 * 29, 8) and "8 epochs of 30,000 rows = 232 steps" in small.describe()
    assert training_budget(tc, 200_000).steps == 5 * (200_000 // 1024)  # the 1M-row floor, 5 whole passes
    assert training_budget(tc, 300_000).steps == round(1_000_000 / 1024)  # the floor, not whole passes
    sae = SAE(kind="topk", n_latents=64, k=4)
    assert sae.n_atoms == 64 and sae.name == "topk-k4-n64"
    assert SAE(**sae._config())._config() == sae._config()


def test_auxk_dense_and_sparse_paths_agree(monkeypatch):
    # AuxK decodes densely over the dead latents when they are few, sparsely otherwise: same loss and gradients
    from vitatlas.learners.sae import objectives as O
    from vitatlas.learners.sae.model import SAEModule

    cfg = SAE(kind="topk", n_latents=48, k=3).config
    X = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = SAEModule.initial(cfg, 16, X.mean(0), 1.0, seed=0, device="cpu", dtype=torch.float64).requires_grad_(True)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True
    got = {}
    for ratio in (0, 100):  # 0: always sparse; 100: always dense
        monkeypatch.setattr(O, "AUX_DENSE_RATIO", ratio)
        for p in m.parameters():
            p.grad = None
        out = O.topk_objective(m, X, dead, aux_k=5)
        out.loss.backward()
        got[ratio] = [out.aux] + [p.grad.clone() for p in m.parameters()]
    assert got[0][0] > 0
    for a, b in zip(got[0], got[100]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
