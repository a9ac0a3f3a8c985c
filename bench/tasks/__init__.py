"""One task module per system, each registering the same body from `bench.tasks.body`."""
