"""The streaming top-examples pass: one walk over a store keeps, for every atom, its top-N images.

Rows are read in store order (no shuffle), encoded chunk by chunk, and grouped into images with the
store's index (an extraction writes the rows of one image contiguously; an image cut by a chunk or
shard boundary is carried over to the next chunk). Per image and atom the *image activation* is the
atom's maximum (``rank="max"``) or mean (``rank="mean"``) code over the image's rows (one row for a
CLS store). A running top-N per atom is merged with ``torch.topk`` over ``[kept, new]``, and the
atom's code on every row of each kept image is kept with it, so heatmaps need no second pass.

Memory is O(A·N·P) for the kept lists (P = rows per image, stored as float16), O(A·B) for the
statistics (B histogram bins) and O(chunk·A) for one chunk's dense codes — never the whole store.

Per atom and *side* (the positive side: codes > 0; the negative side, for signed codes: −codes > 0,
i.e. the atom's negation treated as an atom of its own) the pass also counts:

- ``frequency``: fraction of rows where the side fires (code > 0);
- ``mean_activation`` / ``max_activation``: mean / maximum of the code over those rows;
- a histogram of the code over those rows in log-spaced bins (``HIST_PER_DECADE`` per decade from
  10^HIST_LOG_LO to 10^HIST_LOG_HI; values outside are clipped into the first / last bin).

An image enters a side's top list only if the side fires on at least one of its rows.

The whole state is a dict of tensors, so it is checkpointed atomically (safetensors) together with
the number of rows already absorbed, and a resumed pass continues from there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..data.store import ActivationStore
from ..dictionary import Dictionary
from ..errors import VitatlasError
from .tensorfile import save_safetensors

RANKS = ("max", "mean")
HIST_LOG_LO, HIST_LOG_HI, HIST_PER_DECADE = -6, 6, 4
N_BINS = (HIST_LOG_HI - HIST_LOG_LO) * HIST_PER_DECADE
SIDES = ("pos", "neg")


def hist_edges() -> np.ndarray:
    return np.logspace(HIST_LOG_LO, HIST_LOG_HI, N_BINS + 1)


def rows_per_image(store: ActivationStore) -> int:
    """Rows each image contributes: the store's token positions (1 for CLS and from-npy stores)."""
    positions = store.manifest.get("token_positions")
    return len(positions) if positions else 1


@dataclass
class PassSettings:
    top: int
    rank: str
    n_atoms: int          # atoms kept (the first n_atoms of the dictionary)
    signed: bool          # keep a negative side
    patches: bool         # keep per-row codes of kept images (P > 1)
    chunk_rows: int
    faith_images: np.ndarray  # sorted image ids whose per-image activations are kept for AUROC

    def identity(self, dictionary: Dictionary, store: ActivationStore) -> dict:
        return {"store": str(store.path.resolve()), "store_rows": store.n_rows, "dictionary": dictionary.kind,
                "dictionary_atoms": int(dictionary.n_atoms), "top": self.top, "rank": self.rank,
                "n_atoms": self.n_atoms, "signed": self.signed, "n_faith_images": int(self.faith_images.size),
                "atoms_sum": float(dictionary.atoms.double().sum())}


def new_state(s: PassSettings, P: int, device: str) -> dict[str, torch.Tensor]:
    A, N = s.n_atoms, s.top
    state: dict[str, torch.Tensor] = {}
    for side in SIDES if s.signed else SIDES[:1]:
        state[f"{side}.values"] = torch.full((N, A), -torch.inf, device=device)
        state[f"{side}.image_ids"] = torch.full((N, A), -1, dtype=torch.int64, device=device)
        if s.patches:
            state[f"{side}.patch_values"] = torch.zeros((A, N, P), dtype=torch.float16, device=device)
        state[f"{side}.count"] = torch.zeros(A, dtype=torch.int64, device=device)
        state[f"{side}.total"] = torch.zeros(A, dtype=torch.float64, device=device)
        state[f"{side}.peak"] = torch.zeros(A, device=device)
        state[f"{side}.hist"] = torch.zeros((A, N_BINS), dtype=torch.int64, device=device)
    state["faith.scores"] = torch.zeros((s.faith_images.size, A), device=device)
    return state


def _update_stats(state: dict, side: str, atoms: torch.Tensor, values: torch.Tensor) -> None:
    """Frequency, sum, max and histogram from the non-zero codes (atom, value) of one chunk."""
    fires = values > 0
    atoms, values = atoms[fires], values[fires]
    if not atoms.numel():
        return
    A = state[f"{side}.count"].shape[0]
    state[f"{side}.count"] += torch.bincount(atoms, minlength=A)
    state[f"{side}.total"].index_add_(0, atoms, values.double())
    state[f"{side}.peak"].scatter_reduce_(0, atoms, values, reduce="amax")
    b = ((torch.log10(values) - HIST_LOG_LO) * HIST_PER_DECADE).floor().long().clamp_(0, N_BINS - 1)
    state[f"{side}.hist"].view(-1).index_add_(0, atoms * N_BINS + b, torch.ones_like(b))


def _update_top(state: dict, side: str, per_image: torch.Tensor, sign: float, peak: torch.Tensor,
                score: torch.Tensor, image_ids: torch.Tensor) -> None:
    """Merge the chunk's images into the running top-N of ``side``.

    per_image: (n_img, P, A) codes; the side's codes are ``sign * per_image``, its image maxima
    ``peak`` and ranking scores ``score`` (n_img, A). The N kept entries of an atom are unordered
    *slots* (sorted once at the end): a new image that makes the top N takes the slot of the entry
    it pushes out, so only the new entries' patch codes are written — not the whole (A, N, P) block.
    """
    score = score.masked_fill(peak <= 0, -torch.inf)               # only images where the side fires
    kept = state[f"{side}.values"]
    N, A = kept.shape
    if not bool((score.amax(0) > kept.amin(0)).any()):
        return                                                     # nothing enters any top list
    _, pick = torch.topk(torch.cat([kept, score]), k=N, dim=0)
    chosen = torch.zeros((N + score.shape[0], A), dtype=torch.bool, device=kept.device)
    chosen.scatter_(0, pick, True)
    # per atom, as many slots are freed as new images enter; nonzero() lists both atom-major, so the
    # k-th freed slot of an atom pairs with the k-th new image of the same atom
    slot_atoms, slots = (~chosen[:N]).T.nonzero(as_tuple=True)
    new_atoms, new_imgs = chosen[N:].T.nonzero(as_tuple=True)
    kept[slots, slot_atoms] = score[new_imgs, new_atoms]
    state[f"{side}.image_ids"][slots, slot_atoms] = image_ids[new_imgs]
    key = f"{side}.patch_values"
    if key in state:
        state[key][slot_atoms, slots] = (sign * per_image[new_imgs, :, new_atoms]).to(torch.float16)


def sorted_state(state: dict, chunk: int = 1024) -> dict:
    """Sort every atom's slots by value, descending (−1 ids where a list is short), in place.

    Patch codes are permuted ``chunk`` atoms at a time so that sorting adds no second copy of the
    largest tensor (A, N, P).
    """
    for side in SIDES:
        if f"{side}.values" not in state:
            continue
        values, order = torch.sort(state[f"{side}.values"], dim=0, descending=True, stable=True)
        ids = state[f"{side}.image_ids"].gather(0, order)
        state[f"{side}.values"], state[f"{side}.image_ids"] = values, ids.masked_fill(torch.isinf(values), -1)
        key = f"{side}.patch_values"
        if key in state:
            pv = state[key]
            for a in range(0, pv.shape[0], chunk):
                o = order[:, a:a + chunk].T.unsqueeze(-1).expand(-1, -1, pv.shape[2])
                pv[a:a + chunk] = pv[a:a + chunk].gather(1, o)
    return state


def _absorb(state: dict, s: PassSettings, codes: torch.Tensor, ids: np.ndarray, P: int) -> None:
    """Absorb the codes (rows, A) of whole images whose image ids per row are ``ids``."""
    n_img = codes.shape[0] // P
    img_ids_np = ids[::P]
    if not np.array_equal(np.repeat(img_ids_np, P), ids):
        bad = img_ids_np[np.nonzero(np.repeat(img_ids_np, P) != ids)[0][0] // P]
        raise VitatlasError(f"the store's rows of image {bad} are not {P} contiguous rows: interpret needs a store "
                            "written by `vitatlas extract` or `store from-npy`")
    img_ids = torch.from_numpy(img_ids_np.astype(np.int64)).to(codes.device)
    per_image = codes.reshape(n_img, P, -1)
    faith_sel = np.isin(img_ids_np, s.faith_images)
    faith_pos = np.searchsorted(s.faith_images, img_ids_np)
    rows, atoms = codes.nonzero(as_tuple=True)
    nz = codes[rows, atoms]
    high = per_image.amax(1)                                       # (n_img, A)
    mean = per_image.mean(1) if s.rank == "mean" else None
    _update_stats(state, "pos", atoms, nz)
    _update_top(state, "pos", per_image, 1.0, high, high if mean is None else mean, img_ids)
    mag = high
    if s.signed:
        low = -per_image.amin(1)                                   # the negative side's image maxima
        _update_stats(state, "neg", atoms, -nz)
        _update_top(state, "neg", per_image, -1.0, low, low if mean is None else -mean, img_ids)
        mag = torch.maximum(high, low)
    if faith_sel.any():
        # image activation for AUROC: the atom's largest |code| on the image, as evaluate uses
        sel = torch.from_numpy(faith_sel).to(codes.device)
        state["faith.scores"][torch.from_numpy(faith_pos[faith_sel]).to(codes.device)] = mag[sel]


CHECKPOINT_NAME = "top-state.safetensors"


def _load_checkpoint(checkpoint_dir: Path | None, identity: dict, device: str, name: str = CHECKPOINT_NAME
                     ) -> tuple[dict | None, int]:
    """The saved state and the rows it covers, or (None, 0). One file: tensors and metadata commit together."""
    if checkpoint_dir is None or not (checkpoint_dir / name).is_file():
        return None, 0
    from safetensors import safe_open

    from ..io import load_safetensors

    path = checkpoint_dir / name
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged checkpoint is only lost time: start over
        return None, 0
    if json.loads(meta.get("identity", "null")) != identity:
        raise VitatlasError(f"the checkpoint {path} was made with another run, store or settings: "
                            "delete it or pass another --out")
    state = {k: v.to(device) for k, v in load_safetensors(path, "interpret checkpoint").items()}
    return state, int(meta["rows_done"])


def _save_checkpoint(checkpoint_dir: Path, state: dict, identity: dict, rows_done: int,
                     name: str = CHECKPOINT_NAME) -> None:
    save_safetensors(checkpoint_dir / name, state,
                            metadata={"identity": json.dumps(identity), "rows_done": str(rows_done)})


def rank_rows(index_ids: np.ndarray) -> range:
    """This rank's contiguous rows, cut only between images: whole images are split across ranks."""
    n = len(index_ids)
    starts = np.flatnonzero(np.r_[True, index_ids[1:] != index_ids[:-1]]) if n else np.zeros(0, np.int64)
    runs = distributed.shard(len(starts))
    bound = lambda i: int(starts[i]) if i < len(starts) else n  # noqa: E731
    return range(bound(runs.start), bound(runs.stop))


def _rank_checkpoint_name() -> str:
    w = distributed.world()
    return f"top-state-rank{w.rank}-of-{w.size}.safetensors"


@torch.no_grad()
def top_examples_pass(dictionary: Dictionary, store: ActivationStore, s: PassSettings, *, device: str = "cpu",
                      progress: bool = True, checkpoint_dir: str | Path | None = None,
                      checkpoint_seconds: float = 60.0) -> dict[str, torch.Tensor]:
    """Run the pass (resuming from ``checkpoint_dir`` when it holds a matching state).

    Returns the state with sorted top lists: ``{side}.values`` / ``{side}.image_ids`` (N, A),
    ``{side}.patch_values`` (A, N, P), ``{side}.count/total/peak`` (A,), ``{side}.hist`` (A, bins),
    ``faith.scores`` (len(faith_images), A); side is ``pos`` and, for signed codes, ``neg``.

    Under torchrun each rank streams its own whole images (``rank_rows``) into its own state, saved to its
    own checkpoint file (``top-state-rankR-of-N``: a resume needs the same N); the states are then
    combined (``all_reduce_state``) and rank 0 saves the whole state as the one-process pass does, so a
    finished pass is reused by any N. Every rank returns the same combined state.
    """
    from tqdm.auto import tqdm

    P = rows_per_image(store)
    identity = s.identity(dictionary, store)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    world = distributed.world()
    index_ids = store.index[:, 0]
    rows = range(store.n_rows)
    name = CHECKPOINT_NAME
    rank_identity = identity
    if world.distributed:
        done, rows_done = _load_checkpoint(ckpt, identity, device)
        if done is not None and rows_done == store.n_rows:  # a finished pass, by any number of processes
            return sorted_state(done)
        rows = rank_rows(index_ids)
        name, rank_identity = _rank_checkpoint_name(), identity | {"rows": [rows.start, rows.stop]}
    state, rows_done = _load_checkpoint(ckpt, rank_identity, device, name)
    if state is None:
        state, rows_done = new_state(s, P, device), rows.start
    pending_codes: torch.Tensor | None = None
    pending_start = rows_done
    last_save = time.perf_counter()
    bar = tqdm(total=len(rows), initial=rows_done - rows.start, unit="row", desc=f"interpret {dictionary.kind}",
               disable=not progress or not world.is_main)
    if world.distributed:
        batches = store.iter_range(rows_done, rows.stop, s.chunk_rows)
    else:
        # a small read buffer: the store then holds about one shard (as float32) at a time, not 256 MB
        buffer = s.chunk_rows * store.d * 4
        batches = store.iter_batches(s.chunk_rows, shuffle=False, with_offsets=True, buffer_bytes=buffer)
    for start, batch in batches:
        end = start + batch.shape[0]
        if end <= rows_done:
            continue
        if start < rows_done:
            batch, start = batch[rows_done - start:], rows_done
        x = torch.from_numpy(batch if batch.flags.writeable else batch.copy()).to(device)
        codes = dictionary.encode(x)[:, :s.n_atoms].to(device=device, dtype=torch.float32)
        if pending_codes is not None:
            codes = torch.cat([pending_codes, codes])
        ids = index_ids[pending_start:end]
        # keep the last image for the next chunk unless this part of the store ends here
        cut = codes.shape[0] if end == rows.stop else _last_run_start(ids)
        if cut:
            _absorb(state, s, codes[:cut], ids[:cut], P)
        pending_codes = codes[cut:] if cut < codes.shape[0] else None
        pending_start += cut
        bar.update(end - start)
        if ckpt is not None and time.perf_counter() - last_save > checkpoint_seconds:
            _save_checkpoint(ckpt, state, rank_identity, pending_start, name)
            last_save = time.perf_counter()
    bar.close()
    if pending_codes is not None:  # cannot happen: the last chunk absorbs everything
        raise VitatlasError("internal error: rows left over after the last chunk")
    if world.distributed:
        if ckpt is not None:
            _save_checkpoint(ckpt, state, rank_identity, rows.stop, name)
        state = all_reduce_state(state, s)
        if ckpt is not None and world.is_main:
            _save_checkpoint(ckpt, state, identity, store.n_rows)
    elif ckpt is not None:
        _save_checkpoint(ckpt, state, identity, store.n_rows)
    return sorted_state(state)


def all_reduce_state(state: dict, s: PassSettings) -> dict[str, torch.Tensor]:
    """Combine the ranks' states (disjoint images) into the state of the whole store, on every rank.

    Counts, sums and histograms are summed, maxima maxed, the per-image AUROC scores summed (each image's
    row is non-zero on one rank only); the top lists are gathered and merged, by value descending with
    ties broken by image id ascending, so the result does not depend on the number of ranks.
    """
    out = dict(state)
    for key, t in state.items():
        side, _, part = key.partition(".")
        if part in ("count", "total", "hist") or key == "faith.scores":
            out[key] = distributed.all_reduce_(t.clone(), "sum")
        elif part == "peak":
            out[key] = distributed.all_reduce_(t.clone(), "max")
    for side in SIDES:
        if f"{side}.values" not in state:
            continue
        keys = [f"{side}.values", f"{side}.image_ids"] + ([f"{side}.patch_values"] if s.patches else [])
        parts = distributed.all_gather_object([state[k].cpu().numpy() for k in keys])
        values = torch.from_numpy(np.concatenate([p[0] for p in parts]))           # (W·N, A)
        ids = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        pick = distributed.merge_top(values, ids, s.top)                             # (N, A)
        device = state[keys[0]].device
        out[keys[0]] = values.gather(0, pick).to(device)
        out[keys[1]] = ids.gather(0, pick).to(device)
        if s.patches:
            patches = torch.from_numpy(np.concatenate([p[2] for p in parts], axis=1))  # (A, W·N, P)
            index = pick.T.unsqueeze(-1).expand(-1, -1, patches.shape[2])
            out[keys[2]] = patches.gather(1, index).to(device)
    return out


def _last_run_start(ids: np.ndarray) -> int:
    """Index where the final run of equal image ids starts."""
    change = np.nonzero(ids[1:] != ids[:-1])[0]
    return int(change[-1] + 1) if change.size else 0

