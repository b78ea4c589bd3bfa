"""The privacy layer: trains original, oracle and shadow models, unlearns them, and measures privacy.

* :mod:`~overunlearn.privacy.runner` -- :class:`~overunlearn.privacy.runner.PrivacyRunner` and
  :func:`~overunlearn.privacy.runner.privacy_report`: model sets (cached), unlearning, per-example
  signals, then the pure metrics of :mod:`overunlearn.metrics` (MIA, U-LiRA, KLoM);
* :mod:`~overunlearn.privacy.setups` -- ready-made setups (scikit-learn digits) and benchmark adapters;
* :mod:`~overunlearn.privacy.columns` -- privacy columns for a sweep report (the selected hyperparameters
  of every method), a section that ``overunlearn report --privacy`` adds to the report;
* :mod:`~overunlearn.privacy.plots` -- loss histograms and KLoM CDFs of the per-example arrays.

It sits above :mod:`overunlearn.report` (it reads a report's selected points and renders its columns
with the report's tables), which never trains.
"""
