"""The one path from "an update arrived on SubmitUpdate" to "accepted and journaled".

Shared by the aggregator and the relay, so neither imports the other's internals:

- `intake.submission`  the `Submission`, header checks, the sender's manifest;
- `intake.validation`  tensor checks against the base (names, shapes, dtypes, finite, norm bound);
- `intake.accept`      `Intake`, the accept step, over a `Receiver` (rounds or a relay window);
- `intake.journal`     the durable record of bases, accepted updates and refusals;
- `intake.agents`      the registry of agents a home has heard from;
- `intake.home`        `Home`, what an agent-facing server is to its agents;
- `intake.service`     AgentService over any `Home` (the only module here that speaks gRPC).

Refusal codes are `proto.errors.Refusal`.
"""
