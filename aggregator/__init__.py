"""The aggregator: rounds, aggregation strategies, semi-global synthesis, and the home its agents see.

Updates reach a round through `intake` (the one submit path, shared with the
relay); AgentService is `intake.service.AgentServicer` over `aggregator.home.AggregatorHome`.
"""
