"""Distillation methods contributed as modules: every module in this package is imported with the
method registry (:func:`mopd.opd.methods.load_plugins`) and registers its own method spec. Each counts
in the code identity of the stages that load the registry (``__mopd_plugins__``)."""

__mopd_plugins__ = True
