"""Numbers every door takes on its command line, refused by argparse before anything starts (exit 2).

Found by a QA pass: -1 windows per batch was numpy's "negative dimensions" deep in a run, a port of
500051 served on 500051 mod 65536 without a word, --http-port 99999 was a traceback, and limits of 0 or
less made a server refuse every request or fall back to its default.
"""

from __future__ import annotations

import pytest

from dannucnet.cli import main as cli_main


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        cli_main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "segment", "batch-slides", "serve"])
@pytest.mark.parametrize(("value", "message"), [("-1", "must be 1 to 512 windows, not -1"),
                                                ("0", "must be 1 to 512 windows, not 0"),
                                                ("1000000", "must be 1 to 512 windows, not 1000000"),
                                                ("two", "must be a whole number, not 'two'")])
def test_every_door_refuses_a_batch_size_it_would_fail_on(tmp_path, capsys, command, value, message):
    """-1 was numpy's "negative dimensions" deep in a run, 0 silently the default, 10**6 a MemoryError."""
    option = "--max-batch" if command == "serve" else "--batch-size"
    needs = {"evaluate": ["--data", str(tmp_path)], "segment": [str(tmp_path / "x.tif")],
             "batch-slides": [str(tmp_path)], "serve": []}[command]
    assert f"argument {option}: {message}" in _refused([command, *needs, option, value], capsys)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--port", "500051", "must be 0 to 65535, not 500051"),
    ("--port", "-5", "must be 0 to 65535, not -5"),
    ("--http-port", "99999", "must be -1 to 65535, not 99999"),
    ("--max-pixels", "-5", "must be 1 to"),
    ("--max-polygons", "0", "must be 1 to"),
    ("--max-pending", "0", "must be 1 to"),
    ("--max-connections", "0", "must be 1 to"),
    ("--max-message-mb", "0", "must be 0.001 to 2047 MiB, not 0"),
    ("--max-message-mb", "nan", "must be 0.001 to 2047 MiB, not nan"),
    ("--grace", "-1", "must be 0 to 86400 s, not -1"),
    ("--port", "http", "must be a whole number, not 'http'"),
])
def test_serve_refuses_ports_and_limits_it_cannot_serve_with(capsys, option, value, message):
    assert f"argument {option}: {message}" in _refused(["serve", option, value], capsys)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_batch_slides_refuses_no_workers(tmp_path, capsys, value):
    err = _refused(["batch-slides", str(tmp_path), "-o", str(tmp_path / "out"), "--workers", value], capsys)
    assert f"argument --workers: must be 1 to 1024, not {value}" in err
