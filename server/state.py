"""Process lifecycle flags shared by the runner and the health endpoints."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Lifecycle:
    draining: bool = False
