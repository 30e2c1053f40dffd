"""Evidence for HCRAL: the ``hcral ablate`` grid runner, its statistics, ``hcral figures`` and ``hcral analyze``.

- :mod:`hcral.experiments.ablate`: SPEC files -> resumable grids of training runs -> CSV and Markdown
  tables (mean, std, paired differences with 95% t-intervals);
- :mod:`hcral.experiments.stats`: mean, std, Student t quantile, paired differences;
- :mod:`hcral.experiments.figures`: Fig. 3(a)-(c) of the paper and the per-prior analysis plots
  (needs the ``plot`` extra: matplotlib);
- :mod:`hcral.experiments.analyze`: where a trained run's AP goes (score-IoU correlation, AP at
  IoU 0.5 / 0.75 / 0.9, TP / FP scores, with and without centerness).
"""
