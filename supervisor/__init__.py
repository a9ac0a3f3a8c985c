"""The fleetd arbiter: config, process supervision, signals, control server, operations."""
