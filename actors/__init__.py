"""Ray actors: thin shells over the plain-Python cores in :mod:`corral.core`."""
