"""The manager core, async (the source of the generated sync twin in ``_sync``)."""
