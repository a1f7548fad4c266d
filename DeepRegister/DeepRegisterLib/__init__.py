"""DeepRegister's registration library: usable without Slicer.

``DeepRegisterLib.register`` is :func:`DeepRegisterLib.registration.register`; it is imported on
first use so that importing the package (e.g. to check whether torch is installed) stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register", "RegistrationResult", "RegistrationCancelled"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import registration

        return getattr(registration, name)
    raise AttributeError(f"module 'DeepRegisterLib' has no attribute '{name}'")
