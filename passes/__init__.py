"""The built-in passes, installed as ``onnxprune.passes``.

Every module in this package is imported here, and each registers its passes with
:func:`onnxprune.register_pass`, so adding a pass means adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
