"""coordinator.hub without a server: semantic versions, references, and every field's specific refusal."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from coordinator.hub import Hub, ReleaseTag, Version, parse_ref
from coordinator.index import ModelIndex
from proto.errors import (
    Conflict,
    FailedPrecondition,
    IntegrityError,
    InvalidInput,
    NotFound,
    StrataError,
)
from storage.codec import encode_tensors
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer
from storage.models import save_model
from storage.store import LocalStore

KEY = KeyPair.generate()
OPERATOR = Producer(role="operator", id="alice")
MEGABYTE = "x" * (1 << 20)


@pytest.fixture
def store(tmp_path) -> Iterator[LocalStore]:  # noqa: ANN001
    with LocalStore(tmp_path / "store") as s:
        yield s


@pytest.fixture
def hub() -> Iterator[Hub]:
    index = ModelIndex(None)
    with Hub(None, index) as h:
        yield h
    index.close()


def _model(store: LocalStore, federation: str, *, kind: str = "base", parents: tuple[str, ...] = (), classes: int = 3) -> Manifest:
    weights = encode_tensors({"fc.weight": np.ones((4, 2), np.float32), "head.weight": np.zeros((classes, 4), np.float32)})
    return save_model(store, weights=weights, kind=kind, federation=federation, round=0, producer=OPERATOR, key=KEY, parents=parents)


def _release(hub: Hub, model: str, version: str, federation: str = "digits") -> str:
    tag = ReleaseTag(federation=federation, version=version, model=model, released_by="operator/alice").signed(KEY)
    return hub.release(tag.to_bytes()).version


def _reason(error: pytest.ExceptionInfo[StrataError]) -> str:
    return error.value.reason


def test_versions_order_by_semver_precedence() -> None:
    texts = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0"]
    assert sorted(texts, key=Version.parse) == texts
    for bad in ("1.0", "01.0.0", "1.0.0-", "v1.0.0", "1.0.0-01", "9" * 70):
        with pytest.raises(InvalidInput) as error:
            Version.parse(bad)
        assert _reason(error) == "bad_version"


def test_references_parse_or_refuse_specifically() -> None:
    assert parse_ref("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG") is None
    assert parse_ref("digits@^1.0") == ("digits", "^1.0")
    assert parse_ref("digits@latest") == ("digits", "latest")
    for bad in ("digits", "digits@", "@1.0.0", "digits@~1", MEGABYTE, "a b@1.0.0"):
        with pytest.raises(InvalidInput) as error:
            parse_ref(bad)
        assert _reason(error) in ("bad_ref", "bad_name")


def test_resolve_latest_caret_and_exact(hub: Hub, store: LocalStore) -> None:
    base = _model(store, "digits")
    hub.create_federation(name="digits", base_manifest=base.to_bytes())
    for version in ("0.9.0", "1.0.0", "1.4.2", "2.0.0-rc.1", "0.2.5", "0.2.7"):
        _release(hub, base.cid, version)
    resolved = {ref: hub.resolve(ref)[1].version for ref in ("digits@latest", "digits@^1", "digits@^1.0", "digits@^0.2", "digits@^0.2.5", "digits@1.4.2")}
    assert resolved == {
        "digits@latest": "1.4.2",
        "digits@^1": "1.4.2",
        "digits@^1.0": "1.4.2",
        "digits@^0.2": "0.2.7",
        "digits@^0.2.5": "0.2.7",
        "digits@1.4.2": "1.4.2",
    }
    for ref in ("digits@^3", "digits@1.4.3"):
        with pytest.raises(NotFound) as error:
            hub.resolve(ref)
        assert _reason(error) == "unknown_release"
    with pytest.raises(Conflict) as conflict:
        _release(hub, base.cid, "1.4.2")
    assert _reason(conflict) == "release_exists"


def test_every_field_is_bounded(hub: Hub, store: LocalStore) -> None:
    base = _model(store, "digits").to_bytes()
    cases = {
        "bad_name": {"name": "x" * 200},
        "bad_description": {"description": MEGABYTE},
        "bad_task": {"task": MEGABYTE},
        "bad_strategy": {"strategy": "fed avg"},
        "bad_owners": {"owners": [f"operator/{i}" for i in range(1000)]},
        "bad_round_policy": {"round_policy": {str(i): "v" for i in range(100_000)}},
    }
    for reason, fields in cases.items():
        with pytest.raises(InvalidInput) as error:
            hub.create_federation(**{"name": "digits", "base_manifest": base, **fields})
        assert _reason(error) == reason, fields.keys()
    with pytest.raises(InvalidInput) as error:
        hub.create_federation(name="digits", base_manifest=b"x" * (5 << 20))
    assert _reason(error) == "bad_manifest"
    with pytest.raises(InvalidInput) as error:
        hub.create_federation(name="other", base_manifest=base)  # the manifest names another federation
    assert _reason(error) == "bad_base"


def test_release_tags_are_checked(hub: Hub, store: LocalStore) -> None:
    base = _model(store, "digits")
    hub.create_federation(name="digits", base_manifest=base.to_bytes())
    good = ReleaseTag(federation="digits", version="1.0.0", model=base.cid, released_by="operator/alice")
    tampered = good.signed(KEY).to_bytes().replace(b'"1.0.0"', b'"1.0.1"')
    with pytest.raises(IntegrityError) as integrity:
        hub.release(tampered)
    assert _reason(integrity) == "bad_signature"
    for reason, tag in {
        "bad_notes": ReleaseTag(**{**good.__dict__, "notes": MEGABYTE}),
        "bad_accuracy": ReleaseTag(**{**good.__dict__, "accuracy": 1.5}),
        "bad_evaluation": ReleaseTag(**{**good.__dict__, "evaluation": "two words"}),
    }.items():
        with pytest.raises(InvalidInput) as error:
            hub.release(tag.signed(KEY).to_bytes())
        assert _reason(error) in (reason, "bad_tag"), reason
    for junk in (b"", b"{}", b"[1]", b"x" * (100 << 10)):
        with pytest.raises(InvalidInput) as error:
            hub.release(junk)
        assert _reason(error) == "bad_tag"


def test_proposals_refuse_incompatible_shapes_and_stale_heads(hub: Hub, store: LocalStore) -> None:
    base = _model(store, "digits")
    hub.create_federation(name="digits", base_manifest=base.to_bytes())
    fork = _model(store, "wide", kind="fork", parents=(base.cid,), classes=7)
    hub.create_federation(name="wide", base_manifest=fork.to_bytes())
    proposal = _model(store, "digits", kind="proposal", parents=(base.cid, fork.cid), classes=7)
    with pytest.raises(FailedPrecondition) as error:
        hub.propose(proposal.to_bytes())
    assert _reason(error) == "incompatible_shapes"
    same = _model(store, "same", kind="fork", parents=(base.cid,))
    hub.create_federation(name="same", base_manifest=same.to_bytes())
    stale = _model(store, "digits", kind="proposal", parents=(same.cid, base.cid))  # the first parent is not the base
    with pytest.raises(FailedPrecondition) as moved:
        hub.propose(stale.to_bytes())
    assert _reason(moved) == "stale_proposal"
    good = hub.propose(_model(store, "digits", kind="proposal", parents=(base.cid, same.cid)).to_bytes())
    assert good.state == "open" and good.from_federation == "same"
    with pytest.raises(InvalidInput) as bad_merge:
        hub.decide(good.cid, accept=True, merge_manifest=_model(store, "digits", kind="merge", parents=(same.cid,)).to_bytes())
    assert _reason(bad_merge) == "bad_merge"
    assert hub.decide(good.cid, accept=False).state == "declined"
    with pytest.raises(FailedPrecondition) as decided:
        hub.decide(good.cid, accept=False)
    assert _reason(decided) == "already_decided"
    with pytest.raises(InvalidInput) as state:
        hub.proposals(state="x" * 1000)
    assert _reason(state) == "bad_state"


def test_the_registry_survives_a_restart_and_heads_follow_the_index(tmp_path, store: LocalStore) -> None:  # noqa: ANN001
    index = ModelIndex(tmp_path / "index.db")
    base = _model(store, "digits")
    with Hub(tmp_path / "hub.db", index) as hub:
        hub.create_federation(name="digits", base_manifest=base.to_bytes(), owners=["operator/alice"])
        _release(hub, base.cid, "1.0.0")
    cluster = save_model(
        store, weights=store.get(base.weights), kind="cluster", federation="digits", round=1,
        producer=Producer(role="aggregator", id="agg-a"), key=KEY, parents=(base.cid,),
    )  # fmt: skip
    index.record(cluster.to_bytes())
    with Hub(tmp_path / "hub.db", index) as again:
        digits = again.federation("digits")
        assert digits.owners == ("operator/alice",) and digits.heads == {"agg-a": cluster.cid}
        assert again.resolve("digits@latest")[0] == base.cid
        assert again.lineage_root(index.get(cluster.cid)) == base.cid
    index.close()


def test_a_release_root_crosses_rounds_through_bases_and_federations_through_forks(hub: Hub, store: LocalStore) -> None:
    source = _model(store, "digits")
    hub.create_federation(name="digits", base_manifest=source.to_bytes())
    fork = _model(store, "letters", kind="fork", parents=(source.cid,))
    hub.create_federation(name="letters", base_manifest=fork.to_bytes())
    weights = store.get(fork.weights)
    aggregator = Producer(role="aggregator", id="agg-a")
    device_update = save_model(store, weights=weights, kind="local", federation="letters", round=1,
                               producer=Producer(role="agent", id="phone"), key=KEY, base=fork.cid)  # fmt: skip
    # the device update stays out of the index, as in a real fleet: the walk goes on through the cluster's base
    cluster = save_model(store, weights=weights, kind="cluster", federation="letters", round=1, producer=aggregator,
                         key=KEY, parents=(device_update.cid,), base=fork.cid)  # fmt: skip
    semi_global = save_model(store, weights=weights, kind="semi-global", federation="letters", round=1,
                             producer=aggregator, key=KEY, parents=(cluster.cid,), base=fork.cid)  # fmt: skip
    hub._index.record(cluster.to_bytes())
    hub._index.record(semi_global.to_bytes())
    tag = ReleaseTag(federation="letters", version="1.0.0", model=semi_global.cid, released_by="operator/alice")
    assert hub.release(tag.signed(KEY).to_bytes()).lineage_root == source.cid


def test_a_page_is_bounded_by_count_and_bytes_and_says_where_the_next_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator import messages
    from proto import strata_pb2 as pb

    def to_pb(size: int) -> pb.ReleaseRecord:
        return pb.ReleaseRecord(notes="n" * size)

    monkeypatch.setattr(messages, "PAGE_BYTES", 1000)
    sizes = [300, 300, 300, 300, 5000, 10]
    listed, next_offset = messages.page(sizes, to_pb, offset=0, limit=0)
    assert len(listed) == 3 and next_offset == 3  # a fourth would pass the byte budget
    listed, next_offset = messages.page(sizes, to_pb, offset=4, limit=0)
    assert len(listed) == 1 and next_offset == 5  # one record over budget still goes, alone
    assert messages.page(sizes, to_pb, offset=5, limit=0)[1] == 0  # the last page
    assert messages.page(sizes, to_pb, offset=0, limit=2) == ([to_pb(300)] * 2, 2)
    assert messages.page(sizes, to_pb, offset=99, limit=0) == ([], 0)
    assert messages.page([], to_pb, offset=0, limit=0) == ([], 0)

    pages = {0: ([1, 2], 2), 2: ([3], 3), 3: ([4], 0)}
    assert messages.all_pages(pages.__getitem__) == [1, 2, 3, 4]
    assert messages.all_pages(pages.__getitem__, limit=3) == [1, 2, 3]
    # a server that answers with the same offset again does not loop the client forever
    assert messages.all_pages(lambda offset: ([offset], 0 if offset > 5 else 1)) == [0, 1]
