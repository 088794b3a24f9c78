"""ModelCache: heavy models are loaded once per (model id, device, dtype, variant) and reused.

A batch runner keeps one cache for its whole life, so items that share a pipeline share
its weights. The cache holds no global state: whoever builds it owns it and passes it in.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable


@dataclass(frozen=True)
class CacheKey:
    model_id: str
    device: str
    dtype: str
    variant: Hashable = None  # e.g. ("inpaint", ("controlnet_canny",)) for a composed pipeline


class ModelCache:
    """A small LRU of loaded models. `max_items` bounds memory on long batch runs."""

    def __init__(self, max_items: int = 8):
        self.max_items = max_items
        self._items: OrderedDict[CacheKey, Any] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # how many times a factory actually ran (benchmarks read it)

    def get(self, key: CacheKey, factory: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = factory()
            self.loads += 1
            self._items[key] = value
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
            return value

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._items

    def keys(self) -> list[CacheKey]:
        """What is loaded now, least recently used first."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
