"""Broken environments the tests start boxes in, to see a start fail with the box's reason."""

#: A sitecustomize that hides ipykernel from the interpreters that load it, as an image without
#: ipykernel would; everything the box itself imports still loads.
HIDE_IPYKERNEL = """\
import sys

class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "ipykernel" or name.startswith("ipykernel."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Hide())
"""
