"""``vitatlas.evaluate``: every metric of a dictionary on a data set, in one streamed pass.

The metric definitions live with their code: reconstruction and sparsity in ``metrics``, atom labels
in ``labels``, sparse probing and the downstream probe in ``probing``, spatial coherence in
``spatial``. ``report`` writes them out; ``scorecard`` scores several dictionaries on the same rows
(docs/scorecard.md).

Under torchrun (``torchrun --nproc-per-node N -m vitatlas eval ...``) each rank streams its contiguous
part of the rows (``distributed.shard``) through the same accumulators, which are then combined: sums
and counts are all-reduced, the top rows merged (value descending, ties by row number), the kept
activation rows (zeros on other ranks' rows) summed; every rank then holds the same results, equal to
one process's within float rounding. One process runs exactly as before.

``evaluate`` streams the rows once through a few accumulators, each with one job:
``ReconstructionStats`` (reconstruction and sparsity sums), ``TopActivations`` (the top rows per
atom), ``ImageMaxima`` (each atom's image activation, for labels and faithfulness),
``KeptActivations`` (full activation vectors of a bounded subset of whole images, for sparse probing
and spatial coherence) and ``ImageMeans`` (per-image mean activations and reconstructions, for the
downstream probe).
"""

from .scoring import scorecard
from .streamed import evaluate

__all__ = ["evaluate", "scorecard"]
