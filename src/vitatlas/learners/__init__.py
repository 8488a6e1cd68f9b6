"""The learners: one package each, and the machinery they share.

- ``sae/``: sparse autoencoders (``vitatlas.SAE``, ``SAESweep``);
- ``dbksvd/``: Double-Batch K-SVD (``vitatlas.DBKSVD``) with its sparse coders and K-SVD update;
- ``baselines/``: PCA, k-means, random and scikit-learn dictionaries for the same harness;
- ``options`` (declared, checked options), ``options_doc`` (docs/learners.md's tables) and
  ``checkpoint`` (resumable safetensors + JSON checkpoints), shared by all of them.
"""
