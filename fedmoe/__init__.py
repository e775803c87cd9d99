"""fedmoe: FedMoE-DA as a distributed system. The Python API: `fedmoe.run_local(config)`
(fedmoe/api.py), imported on first use so that `import fedmoe.common...` stays light."""

from __future__ import annotations

from typing import Any

__all__ = ["RunFailed", "RunResult", "run_local"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedmoe import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedmoe' has no attribute {name!r}")
