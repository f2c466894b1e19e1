"""The relay: an AgentService for low-power devices with a model cache, pre-aggregation and store-and-forward upstream."""
