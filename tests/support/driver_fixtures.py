"""A fixture for driver-level suites (their conftests import it): ``sandboxes``, every
sandbox a test makes through the ``driver`` fixture its conftest defines, removed at
teardown."""

from __future__ import annotations

import pytest

from tests.support import docker as testkit


@pytest.fixture
async def sandboxes(driver):
    async with testkit.Tracker(driver) as t:
        yield t
