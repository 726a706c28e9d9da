"""The box client in one flavour; import the public names from :mod:`corral.client`."""

from .box import AsyncBoxClient

__all__ = ["AsyncBoxClient"]
