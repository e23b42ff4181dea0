"""The ``backend`` setting of fastenc's modules: None, a backend name for every op, or ``{op: backend}``."""
from __future__ import annotations

from typing import Optional, Tuple

from .backends import BackendSpec, check_spec, op_backends, requested_backend


class BackendSetting:
    """Mixin for modules: validated when set, resolved per op once (a dict lookup per call)."""

    @property
    def backend(self) -> BackendSpec:
        return self.__dict__.get("_backend_spec")

    @backend.setter
    def backend(self, spec: BackendSpec) -> None:
        spec = check_spec(spec)
        self.__dict__["_backend_spec"] = spec
        self.__dict__["_op_backend"] = op_backends(spec)

    def _backend(self, op: str) -> Optional[str]:
        """The ``backend=`` argument this module passes to ``op``."""
        table = self.__dict__.get("_op_backend")
        return None if table is None else table.get(op)

    def _requested(self, op: str) -> Tuple[str, bool]:
        """(backend, named for op) this module asks of ``op``: its own setting (a dict names ops, a string
        is a default for every op), else the context's."""
        spec = self.__dict__.get("_backend_spec")
        if spec is None or (isinstance(spec, dict) and op not in spec):
            return requested_backend(op, None)
        return self._backend(op), isinstance(spec, dict)
