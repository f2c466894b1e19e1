"""The aggregator: rounds, update validation, aggregation strategies, semi-global synthesis and the AgentService it serves."""
