"""CUDA paths against the CPU: every learner, ``evaluate``, extraction, store streaming, interpret, intervene.

Every CUDA test runs the same call on the CPU and on the GPU and compares the results. Without a CUDA
device they are all skipped with the reason (``no CUDA device: ...``); ``scripts/gpu_checks.sh`` runs
this module on a lent GPU machine. Until that has happened, the CUDA paths are untested: this module
only says how they will be checked.

How results are compared (two computations that are not literally the same one never compare bit for bit):

* **float64 runs** (learners, evaluate, interpret): the CPU and the GPU make the same decisions (same
  supports, same batches: every random draw of vitatlas comes from CPU generators or numpy), and their
  float64 round-off (u = 1.1e-16) differs by ~1e-15 relative per operation. After a short fit that
  compounds to far below ``F64_ATOL`` = 1e-6, while a device bug (a dropped update, a wrong row, a
  stale copy of the atoms on the other device) moves results by 1e-2 or more.
* **float32 products**: within the a-priori dot-product bound of ``tests/_tolerance.py``
  (γ_n Σ|x_i y_i|, twice for two evaluations), with TF32 switched off for the whole module (TF32 keeps
  10 mantissa bits and would break the bound by design).
* **float32 model forwards** (extraction, interventions): a ViT is too deep for an a-priori bound, so the
  GPU must be *as accurate as the CPU*: both are compared with a float64 CPU run of the same weights
  and the GPU's largest error may be at most ``ACCURACY_FACTOR`` = 16 times the CPU's (GPU kernels sum
  in other orders, blocks and split-K; 16x leaves room for that) plus a floor of 4 float32 ulps of the
  values' scale (for when the CPU happens to be exact). A wrong device, a missing ``.to`` or a
  half-precision path shows up as errors of 1e-3 relative or more, 100x above that.
* **float32 SAE training with bf16 autocast** (``amp=True``, the CUDA default): the forward runs in
  bfloat16 (8 mantissa bits), so only the quality is compared: explained variance within 0.05.

One known way a float64 comparison could fail without a device bug: Adam divides each gradient entry by
its running RMS, so an entry that is pure round-off on one device and exactly 0 on the other moves by a
full step (~lr). If one SAE parameter is off by ~1e-3 while everything else agrees to 1e-12, suspect
that before the device code.

``VITATLAS_CUDA_TEST_DEVICE=cpu`` runs every comparison CPU against CPU: it checks this module's own
code on a machine without a GPU and proves nothing about CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import save_tiny_dinov2
from _tolerance import product_tolerance

import vitatlas
from vitatlas import ActivationStore, models
from vitatlas.data.batches import iter_batches, rows_of
from vitatlas.data.extract import extract
from vitatlas.data.sources import open_source
from vitatlas.dictionary import LEARNERS
from vitatlas.intervene import Edit, intervene, intervention
from vitatlas.learners.baselines import BASELINES, omp

DEVICE = os.environ.get("VITATLAS_CUDA_TEST_DEVICE", "cuda")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}); "
                "run scripts/gpu_checks.sh on a GPU machine", allow_module_level=True)

F64_ATOL = 1e-6
ACCURACY_FACTOR = 16
SAE_KINDS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _no_tf32():
    """Full float32 GEMMs and convolutions on the GPU (TF32 off), restored afterwards."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def np64(t) -> np.ndarray:
    return (t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64))


def assert_close64(got, want, what: str) -> None:
    got, want = np64(got), np64(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    err = float(np.abs(got - want).max()) if got.size else 0.0
    assert err <= F64_ATOL, f"{what}: GPU and CPU float64 results differ by {err:.3g} (> {F64_ATOL})"


def assert_as_accurate(got, cpu, ref, what: str) -> None:
    """GPU float32 ``got`` vs float64 ``ref`` no worse than ACCURACY_FACTOR x the CPU float32's error."""
    got, cpu, ref = np64(got), np64(cpu), np64(ref)
    err_dev, err_cpu = float(np.abs(got - ref).max()), float(np.abs(cpu - ref).max())
    floor = 4 * np.finfo(np.float32).eps * float(np.abs(ref).max())
    assert err_dev <= ACCURACY_FACTOR * err_cpu + floor, (
        f"{what}: GPU error {err_dev:.3g} vs CPU error {err_cpu:.3g} against float64 (allowed "
        f"{ACCURACY_FACTOR}x + {floor:.2g})")


@pytest.fixture(scope="module")
def X64() -> np.ndarray:
    """2,000 rows, d = 16: 3-sparse signed combinations of 48 unit atoms plus noise (float64)."""
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((48, 16))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((2000, 48))
    for i in range(2000):
        codes[i, rng.choice(48, 3, replace=False)] = rng.uniform(0.5, 2, 3) * rng.choice([-1, 1], 3)
    return codes @ atoms + 0.05 * rng.standard_normal((2000, 16))


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 4, 2000)


# ---- the tolerance model itself -------------------------------------------------------------------------

def test_float32_product_within_the_dot_product_bound():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 384)).astype(np.float32)
    D = rng.standard_normal((1536, 384)).astype(np.float32)
    cpu = torch.from_numpy(X) @ torch.from_numpy(D).T
    dev = (torch.from_numpy(X).to(DEVICE) @ torch.from_numpy(D).to(DEVICE).T).cpu()
    excess = (cpu - dev).abs().numpy() - product_tolerance(X, D)
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} entries beyond the float32 bound: is TF32 on?"


# ---- learners through the Dictionary interface ----------------------------------------------------------

DBKSVD_VARIANTS = {"omp": {}, "mp-refit": {"coder": "mp", "refit": True}, "aksvd": {"approx": True},
                   "matryoshka": {"groups": [16, 48]}, "exact-coding": {"candidates": None}}


@pytest.mark.parametrize("variant", list(DBKSVD_VARIANTS))
def test_dbksvd_fit_and_encode_match_the_cpu(X64, variant):
    opts = dict(epochs=2, sample_batch=512, dtype="float64", seed=0, **DBKSVD_VARIANTS[variant])
    cpu = vitatlas.DBKSVD(48, 3, **opts).fit(X64, progress=False)
    dev = vitatlas.DBKSVD(48, 3, device=DEVICE, **opts).fit(X64, progress=False)
    assert dev.atoms.device.type == torch.device(DEVICE).type
    assert_close64(dev.atoms, cpu.atoms, f"{variant}: atoms")
    assert_close64(dev.history, cpu.history, f"{variant}: per-iteration signal recovered")
    codes = dev.encode(X64)
    assert isinstance(codes, np.ndarray)  # numpy in -> numpy out, whatever the device
    assert_close64(codes, cpu.encode(X64), f"{variant}: codes")
    assert_close64(dev.reconstruct(X64), cpu.reconstruct(X64), f"{variant}: reconstructions")
    sparse = dev.encode_sparse(X64)
    assert sparse.indices.device.type == "cpu"
    assert_close64(dev.decode(sparse), cpu.decode(cpu.encode_sparse(X64)), f"{variant}: decode(SparseCodes)")


def test_dbksvd_partial_fit_and_tensor_inputs_on_the_device(X64):
    cpu = vitatlas.DBKSVD(48, 3, sample_batch=500, dtype="float64").partial_fit(X64)
    dev = vitatlas.DBKSVD(48, 3, sample_batch=500, dtype="float64", device=DEVICE)
    dev.partial_fit(torch.from_numpy(X64).to(DEVICE))  # a tensor already on the GPU
    assert_close64(dev.atoms, cpu.atoms, "partial_fit atoms")
    out = dev.encode(torch.from_numpy(X64).to(DEVICE))
    assert out.device.type == torch.device(DEVICE).type  # torch in -> torch out, on the input's device
    back = cpu.encode(torch.from_numpy(X64).to(DEVICE))  # a CPU dictionary given GPU rows
    assert back.device.type == torch.device(DEVICE).type
    assert_close64(out, back, "codes of device tensors")


def test_dbksvd_float32_codes_as_accurate_as_the_cpu(X64, tmp_path):
    X32 = X64.astype(np.float32)
    run = vitatlas.DBKSVD(48, 3, epochs=2, sample_batch=512).fit(X32, progress=False).save(tmp_path / "run")
    cpu, dev = vitatlas.load(run, device="cpu"), vitatlas.load(run, device=DEVICE)
    assert dev.dtype == torch.float32 and dev.atoms.device.type == torch.device(DEVICE).type
    # the reference: exact OMP over the same (float32) atoms, in float64 on the CPU
    exact = omp(torch.from_numpy(X64), cpu.atoms.double(), 3).numpy()
    codes_cpu, codes_dev = cpu.encode(X32), dev.encode(X32)
    same_dev = ((codes_dev != 0) == (exact != 0)).all(1)
    same_cpu = ((codes_cpu != 0) == (exact != 0)).all(1)
    # a float32 coder may pick another atom only where two atoms are within round-off of each other
    assert same_dev.mean() >= same_cpu.mean() - 0.01, f"{same_dev.mean():.3f} vs CPU {same_cpu.mean():.3f}"
    rows = same_dev & same_cpu
    assert_as_accurate(codes_dev[rows], codes_cpu[rows], exact[rows], "float32 OMP codes")
    assert_as_accurate(dev.reconstruct(X32)[rows], cpu.reconstruct(X32)[rows], exact[rows] @ np64(cpu.atoms),
                       "float32 reconstructions")


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_sae_fit_matches_the_cpu_in_float64(X64, kind, tmp_path):
    opts = dict(n_latents=48, epochs=2, batch_size=256, seed=3, dtype="float64")
    if kind in ("topk", "batchtopk", "matryoshka"):
        opts["k"] = 3
    cpu = vitatlas.SAE(kind=kind, **opts).fit(X64, progress=False)
    dev = vitatlas.SAE(kind=kind, device=DEVICE, **opts).fit(X64, progress=False)
    for name, value in cpu.params.items():
        assert dev.params[name].device.type == torch.device(DEVICE).type, name
        assert_close64(dev.params[name], value, f"{kind}: parameter {name}")
    for key, value in cpu.fit_info["train_metrics"].items():
        assert dev.fit_info["train_metrics"][key] == pytest.approx(value, abs=F64_ATOL), f"{kind}: {key}"
    assert_close64(dev.encode(X64), cpu.encode(X64), f"{kind}: codes")
    dev.save(tmp_path / "run")  # saved from the GPU, loaded on the CPU: the same dictionary
    assert_close64(vitatlas.load(tmp_path / "run", device="cpu").reconstruct(X64), dev.reconstruct(X64),
                   f"{kind}: reconstruction after save on the GPU and load on the CPU")


@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
@pytest.mark.parametrize("amp", [False, True])
def test_sae_float32_training_reaches_the_cpu_quality(X64, kind, amp):
    opts = dict(n_latents=48, epochs=3, batch_size=256, seed=3, amp=amp)
    if kind == "topk":
        opts["k"] = 3
    X32 = X64.astype(np.float32)
    cpu = vitatlas.SAE(kind=kind, **opts).fit(X32, progress=False)
    dev = vitatlas.SAE(kind=kind, device=DEVICE, **opts).fit(X32, progress=False)
    ev_cpu = vitatlas.evaluate(cpu, X32)["explained_variance"]
    ev_dev = vitatlas.evaluate(dev, X32)["explained_variance"]
    # amp: bfloat16 forward (module docstring); float32 without amp: same steps up to top-k near-ties
    assert abs(ev_dev - ev_cpu) <= (0.05 if amp else 0.01), f"{kind} amp={amp}: EV {ev_dev:.4f} vs CPU {ev_cpu:.4f}"


def _kill_at(step_to_die: int):
    def callback(step, _metrics):
        if step == step_to_die:
            raise KeyboardInterrupt

    return callback


def test_checkpoints_resume_on_the_device(X64, tmp_path):
    """A run killed on the GPU resumes there from its checkpoint (atoms, Adam moments and counters read
    back onto the device) and ends where an uninterrupted GPU run ends."""
    opts = dict(epochs=3, sample_batch=256, checkpoint_every=3, seed=1, dtype="float64", device=DEVICE)
    full = vitatlas.DBKSVD(48, 3, **opts).fit(X64, progress=False)
    with pytest.raises(KeyboardInterrupt):
        vitatlas.DBKSVD(48, 3, **opts).fit(X64, checkpoint_dir=tmp_path / "k", progress=False, callback=_kill_at(11))
    resumed = vitatlas.DBKSVD(48, 3, **opts).fit(X64, checkpoint_dir=tmp_path / "k", progress=False)
    assert_close64(resumed.atoms, full.atoms, "DBK-SVD resumed on the device")

    opts = dict(n_latents=48, k=3, epochs=3, batch_size=200, checkpoint_every=5, seed=3, dtype="float64",
                device=DEVICE)
    full = vitatlas.SAE(kind="topk", **opts).fit(X64, progress=False)
    with pytest.raises(KeyboardInterrupt):
        vitatlas.SAE(kind="topk", **opts).fit(X64, checkpoint_dir=tmp_path / "s", progress=False,
                                              callback=_kill_at(17))
    resumed = vitatlas.SAE(kind="topk", **opts).fit(X64, checkpoint_dir=tmp_path / "s", progress=False)
    for name, value in full.params.items():
        assert resumed.params[name].device.type == torch.device(DEVICE).type, name
        assert_close64(resumed.params[name], value, f"SAE resumed on the device: {name}")


def test_sae_sweep_on_the_device_matches_the_cpu(X64):
    from vitatlas.learners.sae.train import SAESweep

    def members(device):
        common = dict(n_latents=48, epochs=2, batch_size=256, seed=3, dtype="float64", device=device)
        return [vitatlas.SAE(kind="topk", k=2, **common), vitatlas.SAE(kind="batchtopk", k=4, **common)]

    cpu, dev = SAESweep(members("cpu")).fit(X64, progress=False), SAESweep(members(DEVICE)).fit(X64, progress=False)
    for a, b in zip(cpu, dev):
        assert_close64(b.atoms, a.atoms, f"sweep member {a.name}")


@pytest.mark.parametrize("learner", list(BASELINES))
def test_baselines_match_the_cpu(X64, learner):
    assert learner in LEARNERS
    cls = BASELINES[learner]
    args = (4,) if learner == "pca" else (24,) if learner == "kmeans" else (48, 3)
    cpu = cls(*args, dtype="float64").fit(X64)
    dev = cls(*args, dtype="float64", device=DEVICE).fit(X64)
    assert dev.atoms.device.type == torch.device(DEVICE).type
    assert_close64(dev.atoms, cpu.atoms, f"{learner}: atoms")
    assert_close64(dev.encode(X64), cpu.encode(X64), f"{learner}: codes")
    assert_close64(dev.reconstruct(X64), cpu.reconstruct(X64), f"{learner}: reconstructions")


# ---- evaluation ----------------------------------------------------------------------------------------

def test_evaluate_matches_the_cpu(X64, labels, tmp_path):
    vitatlas.DBKSVD(48, 3, epochs=2, sample_batch=512, dtype="float64").fit(X64, progress=False).save(tmp_path / "r")
    image_ids = np.arange(2000) // 4  # 4 rows per "image"
    out = {}
    for device in ("cpu", DEVICE):
        d = vitatlas.load(tmp_path / "r", device=device)
        out[device] = vitatlas.evaluate(d, X64, labels, image_ids=image_ids, batch_size=300)
    cpu, dev = out["cpu"], out[DEVICE]
    scalars = [k for k, v in cpu.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert {"signal_recovered", "explained_variance", "faithfulness", "l0"} <= set(scalars)
    for key in scalars:
        if np.isnan(cpu[key]):
            assert np.isnan(dev[key]), key
        else:
            assert dev[key] == pytest.approx(cpu[key], abs=F64_ATOL), key
    assert_close64(dev["atoms"]["frequency"], cpu["atoms"]["frequency"], "atom frequencies")
    assert_close64(dev["atoms"]["top_values"], cpu["atoms"]["top_values"], "top values")


# ---- store streaming -----------------------------------------------------------------------------------

def test_store_streaming_to_the_device_is_exact(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((1000, 24)).astype(np.float32)
    store = ActivationStore.from_array(tmp_path / "store", X, dtype="float16", shard_bytes=8 << 10)
    for shuffle in (False, True):
        for dtype in (torch.float32, torch.float64):
            cpu = list(iter_batches(store, 96, shuffle=shuffle, seed=5, dtype=dtype, drop_last=shuffle))
            dev = list(iter_batches(store, 96, shuffle=shuffle, seed=5, dtype=dtype, drop_last=shuffle,
                                    device=DEVICE))
            assert len(dev) == len(cpu) > 1
            for a, b in zip(cpu, dev):
                assert b.device.type == torch.device(DEVICE).type and b.dtype == dtype
                assert torch.equal(b.cpu(), a), "float16 -> float32/64 conversion is exact on both devices"
    on_device = torch.from_numpy(X).to(DEVICE)  # a GPU tensor streamed, shuffled, and read back by row ids
    for a, b in zip(iter_batches(X, 128, shuffle=True, seed=1), iter_batches(on_device, 128, shuffle=True, seed=1,
                                                                             device=DEVICE)):
        assert torch.equal(b.cpu(), a)
    ids = np.array([5, 999, 0, 17])
    assert np.array_equal(rows_of(on_device, ids), X[ids])


# ---- extraction ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny") / "model", layers=3, hidden=32, image_size=28, patch=7)


def float64_twin(path: Path):
    """The tiny model in float64 on the CPU, under the same name (the reference of the float32 runs)."""
    from vitatlas.models.hf import HFVisionModel

    m = models.load(f"hf:{path}")
    return HFVisionModel(m.name, m.revision, m._model.double(), m.family, m.transform, device="cpu")


DATA = "embedded:digits"
N_IMAGES = 24


@pytest.fixture(scope="module")
def stores(tiny, tmp_path_factory) -> dict[str, ActivationStore]:
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for device in ("cpu", DEVICE):
        path = root / device.replace(":", "-")
        extract(f"hf:{tiny}", DATA, [1], "all", path, limit=N_IMAGES, batch_size=8, progress=False, device=device)
        out[device] = ActivationStore(path)
    return out


def test_extract_on_the_device_is_as_accurate_as_the_cpu(tiny, stores):
    twin = float64_twin(tiny)
    source = open_source(DATA)
    pixels = twin.preprocess([source.load(i) for i in range(N_IMAGES)]).double()
    ref = twin.residual_streams(pixels, [1])[1].reshape(-1, twin.width)
    cpu, dev = stores["cpu"], stores[DEVICE]
    assert dev.n_rows == cpu.n_rows == ref.shape[0]
    assert np.array_equal(dev.index, cpu.index) and np.array_equal(dev.labels, cpu.labels)
    all_rows = np.arange(cpu.n_rows)
    assert_as_accurate(dev.rows(all_rows), cpu.rows(all_rows), ref, "extracted activations")


def test_extract_cli_with_device(tiny, stores, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "vitatlas", "extract", "--model", f"hf:{tiny}", "--data", DATA,
                        "--layer", "1", "--tokens", "all", "--limit", str(N_IMAGES), "--batch-size", "8",
                        "--device", DEVICE, "--out", str(tmp_path / "cli")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    twin = float64_twin(tiny)
    source = open_source(DATA)
    ref = twin.residual_streams(twin.preprocess([source.load(i) for i in range(N_IMAGES)]).double(), [1])[1]
    rows = np.arange(stores["cpu"].n_rows)
    assert_as_accurate(ActivationStore(tmp_path / "cli").rows(rows), stores["cpu"].rows(rows),
                       ref.reshape(-1, twin.width), "`vitatlas extract --device` activations")


# ---- interpret and intervene ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_on_tiny(stores, tmp_path_factory) -> Path:
    """A float64 DBK-SVD fitted on the CPU store of the tiny model (layer 1, all tokens)."""
    path = tmp_path_factory.mktemp("run") / "dbksvd"
    vitatlas.DBKSVD(24, 3, epochs=3, dtype="float64").fit(stores["cpu"], progress=False).save(path)
    return path


def test_interpret_pass_matches_the_cpu(stores, run_on_tiny):
    store = stores["cpu"]
    cards = {device: vitatlas.interpret(vitatlas.load(run_on_tiny, device=device), store, top=4, device=device,
                                        images=False, progress=False) for device in ("cpu", DEVICE)}
    cpu, dev = cards["cpu"], cards[DEVICE]
    assert set(dev.tensors) == set(cpu.tensors)
    for key, value in cpu.tensors.items():
        assert dev.tensors[key].device.type == "cpu", key
        if value.is_floating_point():
            # codes are float64 and rounded to float32 (patch values to float16) by the pass itself
            tol = 1e-3 if value.dtype == torch.float16 else 1e-5
            assert torch.allclose(dev.tensors[key].double(), value.double(), rtol=tol, atol=tol), key
        else:
            assert torch.equal(dev.tensors[key], value), key
    for a, b in zip(cpu.atoms, dev.atoms):
        assert a["frequency"] == pytest.approx(b["frequency"], abs=1e-9)


def test_intervene_on_the_device_is_as_accurate_as_the_cpu(tiny, run_on_tiny):
    source = open_source(DATA)
    images = [source.load(i) for i in range(6)]
    edits = [Edit(0, "clamp", 2.0, relative=False), Edit(5, "ablate")]
    twin = float64_twin(tiny)
    ref = intervene(twin, vitatlas.load(run_on_tiny), twin.preprocess(images).double(), edits=edits, batch_size=4)
    results = {}
    for device in ("cpu", DEVICE):
        model = models.load(f"hf:{tiny}", device=device)
        results[device] = intervene(model, vitatlas.load(run_on_tiny, device=device), images, edits=edits,
                                    batch_size=4)
    cpu, dev = results["cpu"], results[DEVICE]
    for name in ("before", "after"):
        assert getattr(dev, name).device.type == "cpu", name
        assert_as_accurate(getattr(dev, name), getattr(cpu, name), getattr(ref, name), f"intervene: {name}")
    assert torch.equal(dev.token_mask, cpu.token_mask)
    changed = (ref.after - ref.before).abs().amax(-1) > 0
    assert bool(changed.any()), "the edits must change some tokens, or this test compares nothing"
    # the hooked form on the device edits the same pass
    model = models.load(f"hf:{tiny}", device=DEVICE)
    with intervention(model, vitatlas.load(run_on_tiny, device=DEVICE), None, edits) as run:
        hooked = run.forward(images)
    assert run.calls >= 1 and hooked.device.type == torch.device(DEVICE).type
    assert_as_accurate(hooked.float().cpu(), cpu.after, ref.after, "intervention(): edited forward")


# ---- the command line with --device --------------------------------------------------------------------

def test_cli_fit_eval_interpret_with_device(stores, tmp_path):
    """``vitatlas fit``, ``eval`` (with every baseline) and ``interpret`` with ``--device`` give the CPU's figures."""
    import json

    from vitatlas.cli import main

    store = stores["cpu"].path
    metrics = {}
    for device in ("cpu", DEVICE):
        out = tmp_path / device.replace(":", "-")
        for args in (["fit", "dbksvd", "--acts", str(store), "--atoms", "24", "--k", "3", "--epochs", "2",
                      "--dtype", "float64", "--out", str(out / "ksvd")],
                     ["fit", "sae", "--kind", "topk", "--acts", str(store), "--atoms", "24", "--k", "3", "--epochs", "2",
                      "--batch-size", "64", "--dtype", "float64", "--out", str(out / "sae"), "--no-progress"],
                     ["eval", str(out / "ksvd"), str(out / "sae"), "--acts", str(store), "--out", str(out / "report")],
                     ["interpret", str(out / "ksvd"), "--acts", str(store), "--out", str(out / "cards"), "--top", "4",
                      "--no-images"]):
            main([*args, "--device", device], standalone_mode=False)
        metrics[device] = json.loads((out / "report" / "metrics.json").read_text())
    cpu = {run["name"]: run for run in metrics["cpu"]}
    dev = {run["name"]: run for run in metrics[DEVICE]}
    assert set(dev) == set(cpu) and len(cpu) >= 6, sorted(cpu)  # 2 runs + the baselines
    for name, run in cpu.items():
        fitted_here = not run["baseline"]  # float64 fits: the same numbers; baselines code in float32 (k-means
        # assigns in float32 on the device): near-ties may move a few rows, so only their reconstruction is compared
        keys = [k for k, v in run.items() if isinstance(v, float) and not k.endswith("seconds")] if fitted_here \
            else ["signal_recovered", "explained_variance", "l0"]
        for key in keys:
            want, got = run[key], dev[name][key]
            assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want, abs=1e-5 if fitted_here else 0.01), \
                (name, key, got, want)


def test_classification_protocol_on_the_device(tiny, run_on_tiny, tmp_path):
    """``vitatlas intervene`` (classification protocol) on the GPU picks the same atoms as on the CPU."""
    from vitatlas.intervene.probes import train_probe
    from vitatlas.intervene.protocol import classification_protocol

    source = open_source(DATA)
    out = {}
    for device in ("cpu", DEVICE):
        model = models.load(f"hf:{tiny}", device=device)
        probe = train_probe(model, source, "classification", limit=60, progress=False)
        runs = {"ksvd": vitatlas.load(run_on_tiny, device=device)}
        out[device] = classification_protocol(model, runs, probe, source, limit=60, top_ks=(1, 3), progress=False,
                                              classes=probe.class_names[:2], calibration=0.5)
    cpu, dev = out["cpu"].get("json", out["cpu"]), out[DEVICE].get("json", out[DEVICE])
    assert set(dev) == set(cpu) and "ksvd@top3" in cpu
    for key in ("ksvd@top1", "ksvd@top3"):
        for c, per in cpu[key]["per_class"].items():
            assert dev[key]["per_class"][c]["atoms"] == per["atoms"], (key, c)
        # a float32 near-tie may flip one held-out prediction (1 of ~28 images): rates agree within 0.1
        for rate in ("target_change_rate", "other_change_rate"):
            assert dev[key][rate] == pytest.approx(cpu[key][rate], abs=0.1), (key, rate)


def test_linear_probe_fits_on_device_features():
    from vitatlas.intervene.heads import LinearProbe

    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    cpu = LinearProbe.fit(X, y, task="classification", class_names=["a", "b"], model={})
    dev = LinearProbe.fit(torch.from_numpy(X).to(DEVICE), torch.from_numpy(y).to(DEVICE), task="classification",
                          class_names=["a", "b"], model={})
    assert torch.allclose(dev.weight.cpu(), cpu.weight, atol=1e-3)

