"""Double-Batch K-SVD: the ``DBKSVD`` dictionary (``learner``) and its two interchangeable stages.

``coders`` (sparse coding in the Gram domain: Batch-OMP and matching pursuit, also used by the
baselines), ``ksvd_update`` (the batched rank-1 atom update and the re-draw of unused atoms), ``config``
(the option dataclass). The public names are re-exported here.
"""

from .config import DBKSVDConfig
from .learner import DBKSVD

__all__ = ["DBKSVD", "DBKSVDConfig"]
