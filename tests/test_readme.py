"""The README is the front door: its config tables must match the code, and its two commands must exist."""

from __future__ import annotations

import re

from strata.readme import README, render


def test_config_tables_are_current() -> None:
    text = README.read_text()
    assert render(text) == text, "README config tables are stale: run `make docs`"


def test_every_daemon_has_a_config_table() -> None:
    text = README.read_text()
    for role in ("aggregator", "agent", "coordinator"):
        assert f"<!-- config:{role} -->" in text


def test_readme_setup_is_exactly_two_make_commands() -> None:
    text = README.read_text()
    block = re.search(r"## Two commands.*?```sh\n(.*?)```", text, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_readme_and_synthesis_docstring_state_min_models_for_z() -> None:
    """The z-score threshold is stated in prose twice; both must be the constant the code uses."""
    import aggregator.synthesis as synthesis

    readme = re.findall(r"from (\d+) models up", README.read_text())
    assert readme == [str(synthesis.MIN_MODELS_FOR_Z)], f"README says {readme}, code says {synthesis.MIN_MODELS_FOR_Z}"
    doc = re.findall(r"applied only from\s+(\d+) models up \(MIN_MODELS_FOR_Z", synthesis.__doc__ or "")
    assert doc == [str(synthesis.MIN_MODELS_FOR_Z)], f"synthesis docstring says {doc}"


def test_the_role_table_is_generated_from_trust_roles() -> None:
    from trust.roles import ROLE_TABLE

    text = README.read_text()
    block = re.search(r"<!-- roles -->\n(.*?)<!-- /roles -->", text, re.S)
    assert block is not None, "the README's Security section lost its role table block"
    rows = [line for line in block.group(1).splitlines() if line.startswith("| `")]
    assert len(rows) == len(ROLE_TABLE)
