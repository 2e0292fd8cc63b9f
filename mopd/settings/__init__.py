"""The settings of each stage kind, one module per section of ``params.yaml`` / ``pipelines.yaml``.

A stage imports only its own section's module, so its code identity (:mod:`mopd.codedeps`) holds
its own settings model and no other: editing the distillation settings (:mod:`mopd.opd.settings`)
reruns the distillation family and leaves SFT and the teachers cached. The root models that
assemble every section (:mod:`mopd.config`) are imported by orchestration only.

This package's ``__init__`` imports nothing: importing one section must not import the others.
"""
