"""Drivers start and stop sandbox containers: ``process`` and ``docker``.

Import a driver through :func:`make_driver`; this package imports no backend
library by itself.
"""

from .base import BOX_PORT, ContainerHandle, ContainerSpec, Driver
from .config import DockerDriverConfig, DriverConfig, ProcessDriverConfig, make_driver

__all__ = [
    "BOX_PORT", "ContainerHandle", "ContainerSpec", "Driver", "DriverConfig",
    "ProcessDriverConfig", "DockerDriverConfig", "make_driver",
]
