"""Research analyses on radnode's feature database: no network code here.

Modules
-------
:mod:`~radnode.models.research.featuredb`
    The feature table every processed series adds to (SQLAlchemy: SQLite in the data folder
    by default, or any database URL) and its export in the ``FEAT.csv`` shape.
:mod:`~radnode.models.research.tables`
    Readers of the cohort files (expression matrix, features, clinical table, MSigDB GMT)
    that name the file, row and column of every bad cell; :func:`staged_output`.
:mod:`~radnode.models.research.genemask`
    Gene-masking radiogenomics (Smedley et al., J Med Imaging 2020; ``papers/003``): dense
    networks from the transcriptome to binarised radiomic features and histology/stage,
    grid search per radiomic group, baselines, masking per gene set.
:mod:`~radnode.models.research.survival`
    Cox proportional hazards with bootstrap C-index intervals, Kaplan-Meier risk groups and
    the log-rank test (lifelines).
:mod:`~radnode.models.research.synthetic`
    A synthetic cohort with planted gene set → feature and feature → survival effects: no
    real transcriptome reaches this machine, so the tests check recovery of known answers.
:mod:`~radnode.models.research.plots`
    The PNGs: masking heat-map, Kaplan-Meier curves, batch PCA before/after ComBat.

Heavy libraries (torch, lifelines, matplotlib) are imported by the modules that need them,
so importing this package (as the node's job-completion hook does) stays cheap.
"""
