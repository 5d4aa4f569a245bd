"""Trainer integrations. Import the submodule you need; importing this package imports nothing
heavy (neither TRL nor Axolotl):

* :mod:`solopo_kernels.integrations.trl`: ``SoLoPOConfig``, ``DataCollatorForSoLoPO``,
  ``SoLoPOTrainer`` (needs the ``trl`` extra).
* :mod:`solopo_kernels.integrations.axolotl`: ``SoLoPOPlugin`` for Axolotl (plugin logic works
  without Axolotl; the trainer class needs it).
* :mod:`solopo_kernels.integrations.model_patch`: the per-instance forward patch both use.
"""
