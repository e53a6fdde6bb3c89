r"""Registers the sbi density estimators published as entry points, once sbi's table
of builders exists.

`sbi_fm_plugin_autoload.pth` imports this module at interpreter start-up and calls
:func:`install`. It must cost nothing for programs that never use sbi, so it imports
only what the interpreter has already loaded and merely adds a finder to
`sys.meta_path`. When `sbi.neural_nets.factory` has been executed, the finder hands
over to `sbi_fm_plugin._sbi.load_entry_points`, which reads the entry-point group
`sbi.density_estimators`. Setting the environment variable
`SBI_DISABLE_PLUGIN_AUTOLOAD` to a non-empty value other than `0` switches this off.

Installers copy this file (it lives outside the package so that importing it does not
import torch), so an editable install picks up changes here only when reinstalled.
"""

import os
import sys

TRIGGER = "sbi.neural_nets.factory"
DISABLE_VARIABLE = "SBI_DISABLE_PLUGIN_AUTOLOAD"


def disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "") not in ("", "0")


def install() -> None:
    r"""Arranges for discovery to run right after sbi's builder table is created."""
    if disabled() or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if TRIGGER in sys.modules:
        _discover()
        return
    sys.meta_path.insert(0, _Finder())


def _discover() -> None:
    if disabled():
        return
    for name in ("sbi_fm_plugin", "sbi_fm_plugin._sbi"):
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None)
        if getattr(spec, "_initializing", False):
            # The plugin itself is importing sbi; the package runs discovery once
            # it is complete.
            return
    # Whatever happens here, importing sbi must go on.
    try:
        from sbi_fm_plugin._sbi import load_entry_points

        load_entry_points()
    except Exception as error:  # noqa: BLE001
        import warnings

        warnings.warn(
            "sbi_fm_plugin could not register the density estimators of the entry "
            f"point group 'sbi.density_estimators': {type(error).__name__}: {error}",
            stacklevel=2,
        )


class _Finder:
    r"""Finds nothing itself; wraps the loader of the trigger module."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> object:
        if fullname != TRIGGER:
            return None
        # One shot: later imports of anything, the trigger included, skip this finder.
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = None if find_spec is None else find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


class _Loader:
    r"""Runs the real loader, puts it back in place, then runs discovery."""

    def __init__(self, loader: object) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> object:
        return getattr(self.loader, name)

    def create_module(self, spec: object) -> object:
        return self.loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _discover()
