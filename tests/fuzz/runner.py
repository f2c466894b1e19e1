"""Sending cases as raw bytes over grpc.aio and keeping score.

Every call goes through `channel.unary_unary(path)` (or its streaming
siblings) without serializers, so the server sees exactly the fuzzed bytes, and
every call has a deadline. An `Outcome` is the status (or, for an OK reply
carrying a `reason`, the refusal inside it); a `Tally` keeps the histogram per
RPC and the findings: UNKNOWN or INTERNAL statuses, replies that do not parse,
and OK replies saying `accepted: true`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import grpc

from tests.fuzz.cases import Case

BAD_CODES = frozenset({"UNKNOWN", "INTERNAL"})
# the server built a reply over its own message limit: the request was fine, the state behind it is not
REPLY_TOO_LARGE = "RESOURCE_EXHAUSTED reply_too_large"
_REPLY_TOO_LARGE = "Sent message larger than max"
# the server refused with status details past gRPC's metadata limit: the caller lost the refusal itself
DETAILS_TOO_LARGE = "RESOURCE_EXHAUSTED details_too_large"
_DETAILS_TOO_LARGE = "metadata size exceeds"
# a server stream still open after this long without a message is an open watch, not a failure
STREAM_IDLE_S = 0.5
# at most this many responses are read from one server stream
MAX_READS = 64
# the fuzzer sends up to 4 MiB + 1; it reads whatever the server sends
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass(frozen=True)
class Outcome:
    rpc: str
    kind: str
    status: str
    details: str = ""
    accepted: bool = False
    bad_reply: bool = False
    messages: int = 1
    sample: str = ""

    @property
    def finding(self) -> bool:
        return (
            self.status in BAD_CODES
            or self.status in (REPLY_TOO_LARGE, DETAILS_TOO_LARGE)
            or self.accepted
            or self.bad_reply
            or self.status.startswith("CLIENT_ERROR")
        )


@dataclass
class Tally:
    """Calls, messages and statuses per RPC, and every finding (up to `keep`)."""

    keep: int = 50
    calls: Counter[str] = field(default_factory=Counter)
    messages: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    findings: list[Outcome] = field(default_factory=list)
    finding_count: int = 0
    accepted: int = 0

    def add(self, outcome: Outcome) -> None:
        self.calls[outcome.rpc] += 1
        self.messages[outcome.rpc] += outcome.messages
        self.statuses[(outcome.rpc, outcome.status)] += 1
        self.kinds[outcome.kind.split(":", 1)[0]] += 1
        self.accepted += outcome.accepted
        if outcome.finding:
            self.finding_count += 1
            if len(self.findings) < self.keep:
                self.findings.append(outcome)

    def merge(self, other: Tally) -> None:
        self.calls.update(other.calls)
        self.messages.update(other.messages)
        self.statuses.update(other.statuses)
        self.kinds.update(other.kinds)
        self.findings.extend(other.findings[: max(0, self.keep - len(self.findings))])
        self.finding_count += other.finding_count
        self.accepted += other.accepted

    def histogram(self) -> Counter[str]:
        """Statuses over every RPC."""
        total: Counter[str] = Counter()
        for (_, status), count in self.statuses.items():
            total[status] += count
        return total

    def bad_statuses(self) -> int:
        return sum(count for (_, status), count in self.statuses.items() if status in BAD_CODES)

    def render(self) -> str:
        lines = [f"{'rpc':<48} {'calls':>6} {'msgs':>7}  statuses"]
        for rpc in sorted(self.calls):
            statuses = ", ".join(
                f"{status} {count}" for (path, status), count in sorted(self.statuses.items(), key=lambda kv: -kv[1]) if path == rpc
            )
            lines.append(f"{rpc:<48} {self.calls[rpc]:>6} {self.messages[rpc]:>7}  {statuses}")
        lines.append("histogram: " + ", ".join(f"{s} {c}" for s, c in self.histogram().most_common()))
        lines.append("categories: " + ", ".join(f"{k} {c}" for k, c in self.kinds.most_common()))
        for finding in self.findings:
            lines.append(f"FINDING {finding.rpc} {finding.kind} -> {finding.status} {finding.details[:200]!r} bytes={finding.sample}")
        return "\n".join(lines)


def _reply_status(case: Case, raw: bytes) -> tuple[str, bool, bool]:
    """(status label, accepted, bad_reply) for an OK reply's bytes."""
    try:
        reply = case.rpc.parse_output(raw)
    except Exception:  # noqa: BLE001 - a reply that does not parse is a finding, whatever the error
        return "OK", False, True
    fields = reply.DESCRIPTOR.fields_by_name
    accepted = bool(getattr(reply, "accepted", False)) if "accepted" in fields else False
    reason = getattr(reply, "reason", "") if "reason" in fields and "accepted" in fields else ""
    if accepted:
        return "OK accepted", True, False
    return (f"OK refused:{reason}" if reason else "OK"), False, False


async def _requests(case: Case) -> AsyncIterator[bytes]:
    for index, message in enumerate(case.messages):
        if index == case.stall_at:
            await asyncio.sleep(case.stall_s)
        yield message
    if case.stall_at == len(case.messages):
        await asyncio.sleep(case.stall_s)


async def _read_stream(case: Case, call: grpc.aio.Call) -> tuple[str, bool]:
    """Read a server stream to its end, to MAX_READS, or until it idles; (label, bad_reply)."""
    reads = 0
    while True:
        if case.read_stall_s and reads == 1:
            await asyncio.sleep(case.read_stall_s)
            call.cancel()
            return "OPEN slow_reader", False
        try:
            message = await asyncio.wait_for(call.read(), STREAM_IDLE_S)
        except TimeoutError:
            call.cancel()
            return "OPEN", False
        if message is grpc.aio.EOF:
            return "OK", False
        reads += 1
        try:
            case.rpc.parse_output(message)
        except Exception:  # noqa: BLE001 - see _reply_status
            call.cancel()
            return "OK", True
        if reads >= MAX_READS:
            call.cancel()
            return "OPEN", False


async def send(channel: grpc.aio.Channel, case: Case, *, timeout_s: float = 10.0) -> Outcome:
    """Send one case and classify what came back."""
    rpc = case.rpc
    timeout = timeout_s + case.stall_s + case.read_stall_s
    accepted = bad_reply = False
    details = ""
    try:
        if not rpc.client_streaming and not rpc.server_streaming:
            raw = await channel.unary_unary(rpc.path)(case.messages[0], timeout=timeout)
            status, accepted, bad_reply = _reply_status(case, raw)
        elif rpc.client_streaming and not rpc.server_streaming:
            raw = await channel.stream_unary(rpc.path)(_requests(case), timeout=timeout)
            status, accepted, bad_reply = _reply_status(case, raw)
        elif not rpc.client_streaming:
            call = channel.unary_stream(rpc.path)(case.messages[0], timeout=timeout)
            status, bad_reply = await _read_stream(case, call)
        else:
            call = channel.stream_stream(rpc.path)(_requests(case), timeout=timeout)
            status, bad_reply = await _read_stream(case, call)
    except grpc.aio.AioRpcError as exc:
        status, details = exc.code().name, exc.details() or ""
        if status == "RESOURCE_EXHAUSTED" and _REPLY_TOO_LARGE in details:
            status = REPLY_TOO_LARGE
        elif status == "RESOURCE_EXHAUSTED" and _DETAILS_TOO_LARGE in details:
            status = DETAILS_TOO_LARGE
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the harness's own failures are reported, not hidden
        status, details = f"CLIENT_ERROR {type(exc).__name__}", str(exc)
    return Outcome(
        rpc=rpc.path,
        kind=case.kind,
        status=status,
        details=details,
        accepted=accepted,
        bad_reply=bad_reply,
        messages=len(case.messages),
        sample=case.sample(),
    )


async def run(
    address: str,
    cases: Iterable[Case],
    *,
    concurrency: int = 16,
    timeout_s: float = 10.0,
    tally: Tally | None = None,
    learn: Callable[[Case, str], None] | None = None,
) -> Tally:
    """Send `cases` (drawn lazily, so megabyte cases are not all held at once) with up to
    `concurrency` calls in flight on one channel. `learn(case, status)` hears every outcome
    (CaseFactory.learn builds its corpus from it)."""
    tally = tally if tally is not None else Tally()
    source = iter(cases)
    lock = asyncio.Lock()

    async def worker(channel: grpc.aio.Channel) -> None:
        while True:
            async with lock:
                case = next(source, None)
            if case is None:
                return
            outcome = await send(channel, case, timeout_s=timeout_s)
            tally.add(outcome)
            if learn is not None:
                learn(case, outcome.status)

    async with grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        await asyncio.gather(*(worker(channel) for _ in range(concurrency)))
    return tally

