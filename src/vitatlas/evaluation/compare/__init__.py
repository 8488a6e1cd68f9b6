"""Compare two dictionaries: which concepts they share and which only one has.

Dictionaries of one activation space can be matched by decoder cosine (``decoder``); across models,
layers or token kinds only behaviour means something: how the atoms fire on the same images
(``behaviour``, over the units ``align`` pairs and ``activations`` computes). ``compare`` runs it all
with a shuffled-image null; ``report`` writes compare.json, report.md and the score plot.
"""

from .api import Comparison, compare
from .decoder import decoder_best_matches, decoder_matches
from .space import decoder_space_mismatch

__all__ = ["Comparison", "compare", "decoder_best_matches", "decoder_matches", "decoder_space_mismatch"]
