"""fleetctl: the command-line client of the control plane and of the queue."""
