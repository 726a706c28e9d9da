"""The remote client's operations (the async modules are the source of the generated sync ones)."""
