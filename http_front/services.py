"""What the resources share: the broker client, a short-lived INFO cache, the validator."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from broker import protocol as p
from http_front.broker_client import BrokerClient
from http_front.config import FrontConfig
from http_front.validation import RequestValidator


@dataclass
class Services:
    """Injected into every resource by create_app."""

    broker: BrokerClient
    config: FrontConfig
    validator: RequestValidator
    version: str = "0.1.0"
    _info: tuple[float, dict[str, Any]] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def info(self, max_age: float = 1.0, timeout: float | None = None) -> dict[str, Any]:
        """The broker's INFO reply, cached for `max_age` seconds."""
        with self._lock:
            cached = self._info
        if cached is not None and time.monotonic() - cached[0] <= max_age:
            return cached[1]
        header = self.broker.request(p.INFO, timeout=timeout).header
        with self._lock:
            self._info = (time.monotonic(), header)
        return header

    def loras(self) -> list[dict[str, Any]]:
        """LoRA entries reported by live nodes, merged by name and sorted."""
        merged: dict[str, dict[str, Any]] = {}
        for node in self.info()["nodes"]:
            for entry in node.get("loras", []):
                if isinstance(entry, dict) and "name" in entry:
                    merged.setdefault(entry["name"], entry)
        return [merged[name] for name in sorted(merged)]
