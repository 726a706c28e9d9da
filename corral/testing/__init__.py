"""Test doubles that speak real protocols, for corral's tests and benchmarks.

:mod:`corral.testing.oss_server` is an in-process server for the part of the
Alibaba Cloud OSS REST API that :mod:`corral.storage.oss` calls, with signature
checks and fault injection. It ships inside the package (not under ``tests/``)
so that ``python -m corral.bench.storage_bench`` runs from any checkout.
:mod:`corral.testing.waiting` waits for a condition, for a started process's ready
file and for a process to end (the tests, the benchmarks and the chaos harness).
"""

from corral.testing.oss_server import Fault, OSSServer, StoredObject, crc64_ecma

__all__ = ["Fault", "OSSServer", "StoredObject", "crc64_ecma"]
