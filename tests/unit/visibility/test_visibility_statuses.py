"""Every instance status can be filtered on and is shown by the console and the CLI."""

import re
from pathlib import Path

from kflow._cli.visibility import _STATUS_STYLE
from kflow.model.messages import Status
from kflow.visibility.store import STATUSES

CONSOLE = Path(__file__).parents[3] / "kflow" / "visibility" / "static" / "console.js"


def test_the_visibility_filter_knows_every_status() -> None:
    assert set(STATUSES) == {s.value for s in Status}


def test_the_console_and_the_cli_know_every_status() -> None:
    match = re.search(r"const STATUSES = \[([^\]]*)\]", CONSOLE.read_text())
    assert match is not None
    assert set(re.findall(r'"([A-Z]+)"', match.group(1))) == {s.value for s in Status}
    assert set(_STATUS_STYLE) == {s.value for s in Status}
