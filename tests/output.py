"""Reading what a `framekv ... --json` command printed, in tests."""

from __future__ import annotations

import json


def json_out(capsys) -> dict:
    """The JSON document a `--json` command printed. Ray's driver may put a "(raylet)"
    warning line on stdout first (e.g. once a module's runs have started many workers):
    the document is the rest, from its first line that opens one."""
    out = capsys.readouterr().out
    return json.loads(out if out.startswith(("{", "[")) else out[out.index("\n{") + 1 :])
