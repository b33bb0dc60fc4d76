"""Import optional heavy dependencies at the point of use, with a clear message naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from memplan.errors import MissingExtra

# which extra brings each optional module (see pyproject.toml)
_EXTRA_OF = {
    "torch": "trace",
    "transformers": "trace",
    "peft": "trace",
    "pynvml": "probe",
    "optuna": "tune",
    "bitsandbytes": "qlora",
}


def try_import(module: str) -> ModuleType:
    """Import `module` or raise MissingExtra telling which `pip install 'memplan[extra]'` brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra = _EXTRA_OF.get(top, "all")
        raise MissingExtra(
            f"{top} is not installed ({err.msg}); install it with: pip install 'memplan[{extra}]'"
        ) from None
