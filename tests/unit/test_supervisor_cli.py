"""`moemesh up` and `moemesh serve` flag handling: serve hands unknown flags to the role's main."""

from __future__ import annotations

import sys
import types

import pytest

from moemesh import cli


def test_serve_passes_role_specific_flags_to_the_role_main(monkeypatch):
    seen = {}

    def role_main(args):
        seen["args"] = args
        return 0

    fake = types.ModuleType("moemesh.services.expert.main")
    fake.main = role_main
    monkeypatch.setitem(sys.modules, "moemesh.services.expert.main", fake)
    assert cli.main(["serve", "expert", "--port", "5", "--registry", "h:1", "--num-experts", "8"]) == 0
    args = seen["args"]
    assert (args.role, args.port, args.registry, args.extra) == ("expert", 5, "h:1", ["--num-experts", "8"])


def test_other_subcommands_reject_unknown_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["up", "--bogus", "1"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err


def test_up_rejects_a_bad_worker_count_with_the_field_named(capsys):
    assert cli.main(["up", "--decode", "0"]) == 2
    assert "num_decode=0 must be >= 1" in capsys.readouterr().err
