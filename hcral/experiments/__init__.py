"""Evidence for HCRAL: the ``hcral ablate`` grid runner, its statistics, and ``hcral figures``.

- :mod:`hcral.experiments.ablate`: SPEC files -> resumable grids of training runs -> CSV and Markdown
  tables (mean, std, paired differences with 95% t-intervals);
- :mod:`hcral.experiments.stats`: mean, std, Student t quantile, paired differences;
- :mod:`hcral.experiments.figures`: Fig. 3(a)-(c) of the paper and the per-prior analysis plots
  (needs the ``plot`` extra: matplotlib).
"""
