"""Markdown tables of every learner's options, generated from their declared constraints.

docs/learners.md embeds the output between ``<!-- options:begin -->`` and ``<!-- options:end -->``
and a test keeps the two equal, so the option list is written once (in the dataclasses). Print the
current tables with ``python -m vitatlas.learners.options_doc``.

    >>> print(options_table(PCAConfig).splitlines()[2])
    | `k` | required | a positive integer | components (= atoms, L0) |
"""

from __future__ import annotations

import dataclasses

from .baselines.config import KMeansConfig, PCAConfig, RandomConfig, SklearnDLConfig
from .dbksvd.config import DBKSVDConfig
from .options import Options
from .sae.config import ACTIVATIONS, OptimConfig, TrainConfig

SECTIONS = [
    ("`DBKSVD(n_atoms, k, **options)` — `DBKSVDConfig`", DBKSVDConfig),
    *((f"SAE family `{fam}` — `{cls.__name__}`", cls) for fam, cls in ACTIVATIONS.items()),
    ("Every SAE: how it learns — `OptimConfig` (may differ within a sweep)", OptimConfig),
    ("Every SAE: the data stream — `TrainConfig` (equal within a sweep)", TrainConfig),
    ("`PCABaseline(k, **options)` — `PCAConfig`", PCAConfig),
    ("`KMeansBaseline(n_atoms, **options)` — `KMeansConfig`", KMeansConfig),
    ("`RandomDictionary(n_atoms, k, **options)` — `RandomConfig`", RandomConfig),
    ("`SklearnDictionaryLearning(n_atoms, k, **options)` — `SklearnDLConfig`", SklearnDLConfig),
]


def options_table(cls: type[Options]) -> str:
    rows = ["| option | default | constraint | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        rule = f.metadata["rule"]
        default = "required" if f.default is dataclasses.MISSING else f"`{f.default!r}`"
        constraint = rule.describe() + (" or None" if getattr(rule, "optional", False) else "")
        rows.append(f"| `{f.name}` | {default} | {constraint} | {f.metadata['doc']} |")
    return "\n".join(rows)


def all_tables() -> str:
    return "\n\n".join(f"#### {title}\n\n{options_table(cls)}" for title, cls in SECTIONS)


if __name__ == "__main__":
    print(all_tables())
