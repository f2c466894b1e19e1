"""The relay: an AgentService for low-power devices with a model cache, pre-aggregation and store-and-forward upstream.

Public surface (import from the submodules; nothing loads until used, so
`relay.config` stays cheap for the CLI): `relay.config.RelayConfig` and its
sections, `relay.daemon.RelayDaemon`, `relay.core.Relay` / `CombinedUpdate` /
`STALE_AFTER_OUTAGE`, `relay.cache.ModelCache`, `relay.forward.Forwarder`,
`relay.journal.RelayJournal`, `relay.home.RelayHome` (what devices see, served by `intake.service`).
"""
