"""What every box call pays in the client: no import machinery per request."""

from __future__ import annotations

import asyncio
import importlib.abc
import sys


class _CountingFinder(importlib.abc.MetaPathFinder):
    """Sees every import that is not already in sys.modules (a failed one comes back each time)."""

    def __init__(self) -> None:
        self.looked_up: list[str] = []

    def find_spec(self, fullname, path, target=None):
        self.looked_up.append(fullname)
        return None  # let the real finders answer


def test_httpcore_checks_its_async_library_without_searching_for_modules():
    from httpcore._synchronization import current_async_library

    async def main() -> list[str]:
        current_async_library()  # first call: whatever it imports lazily is imported now
        finder = _CountingFinder()
        sys.meta_path.insert(0, finder)
        try:
            for _ in range(20):
                assert current_async_library() == "asyncio"
        finally:
            sys.meta_path.remove(finder)
        return finder.looked_up

    # sniffio missing would show up here 20 times (one sys.path search per request)
    assert asyncio.run(main()) == []
