"""The coordinator: aggregator membership with leases, the consistent-hash ring, the model index and the agent directory."""
