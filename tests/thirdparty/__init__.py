"""Third-party model code for the ``thirdparty`` tests and ``bench/model_coverage.py``.

Importing this package first makes torchvision importable against a CPU-only torch (see
:mod:`.torchvision_shim`); transformers imports torchvision, so this must precede it.
"""
from .torchvision_shim import install as _install_torchvision_shim

_install_torchvision_shim()
