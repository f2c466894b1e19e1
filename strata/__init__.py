"""The `strata` command: CLI wiring, config loading and the demo."""
