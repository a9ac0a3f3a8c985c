"""Example tasks and the `make demo` script."""
