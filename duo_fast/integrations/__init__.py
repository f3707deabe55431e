"""Drop-in backends for model codebases that train and sample uniform-state
diffusion models.

* :mod:`duo_fast.integrations.duo`: patches the Duo codebase (``algo.py``,
  ``utils.py``, ``trainer_base.py``, ``models/dit.py``) onto duo_fast's ops, in
  the manner of Liger-Kernel's ``apply_liger_kernel_to_*``; ``python -m
  duo_fast.integrations.duo path/to/main.py [overrides]`` runs an unmodified
  ``main.py`` patched.
* :mod:`duo_fast.integrations.duo_reference`: finds and imports a checkout of
  the Duo codebase (``$DUO_REFERENCE_DIR``), standing in for ``flash_attn`` on
  machines that cannot build it; used by the tests and the benchmarks.
"""
