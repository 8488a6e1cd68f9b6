"""Reviving silent SAE latents data-parallel over 2 gloo processes (``sae.resample``): lifting takes the
single-process step (the gaps are reduced over the ranks); resampling draws from rank 0's share of the
batch and gives every rank the same parameters."""

from __future__ import annotations

from _dist import run_ranks
from test_scale_sae import _assert_same, _data, _fit_on_rank, _make, _params

from vitatlas.learners.sae import SAESweep


def test_two_ranks_lift_as_one_process_and_resample_to_the_same_parameters():
    specs = [("topk", {"revive": "lift", "init": "random", "n_latents": 96}),
             ("topk", {"revive": "resample", "init": "random", "n_latents": 96})]
    (p0, _), (p1, _) = run_ranks(_fit_on_rank, specs)
    single = [_make(kind, **kw) for kind, kw in specs]
    SAESweep(single).fit(_data(), progress=False)
    assert all(s.fit_info["revived_latents"] > 0 for s in single)
    want = _params(single)
    _assert_same(p0[:1], want[:1])  # lifting: the single-process parameters on every rank
    _assert_same(p1[:1], want[:1])
    _assert_same(p1[1:], p0[1:])  # resampling: rank 0's draw on every rank
