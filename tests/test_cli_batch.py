"""``dannucnet batch`` makes its segmenter as every other door does (``commands._common.make_segmenter``).

It used to build one by hand and so lost three things the other doors have: the DANNUCNET_TOKEN
fallback, the warning when the model is untrained, and the refusal of ``--tta`` with ``--server``.
Each is checked through the real CLI against a real server on a loopback port. A server is asked
before QuPath starts, so these run without a QuPath installation; where there is none the run then
stops at the project with the message that says what to set.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dannucnet.cli import main
from dannucnet.commands._common import UNTRAINED_WARNING
from dannucnet.qupath.project import PAQUO_HINT, paquo_available

TOKEN = "batch-cli-test-token-0123456789"
QUPATH = paquo_available()  # False here: paquo is installed, QuPath is not


@pytest.fixture(scope="module")
def server(untrained_predictor):
    from dannucnet.service.server import Server, ServerConfig

    srv = Server(untrained_predictor, ServerConfig(host="127.0.0.1", port=0, http_port=None, token=TOKEN)).start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture()
def project(tmp_path) -> Path:
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "project.qpproj").write_text("{}")
    return folder


def _batch(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(["batch", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def _past_the_server(code: int, err: list[str]) -> None:
    """The server accepted the run; without QuPath it then stops at the project, saying what to set."""
    assert not any("token" in line for line in err), err
    if not QUPATH:
        assert code == 2 and PAQUO_HINT in err[-1], err


def test_tta_with_a_server_is_refused_before_anything_runs(project, capsys):
    before = sorted(p.name for p in project.iterdir())
    code, err = _batch([str(project), "--tta", "--server", "127.0.0.1:9"], capsys)  # port 9: nothing listens
    assert code == 2 and len(err) == 1, err
    assert "--tta" in err[0] and "--server" in err[0], err
    assert sorted(p.name for p in project.iterdir()) == before


def test_the_token_comes_from_dannucnet_token_when_not_given(project, server, capsys, monkeypatch):
    monkeypatch.delenv("DANNUCNET_TOKEN", raising=False)
    code, err = _batch([str(project), "--server", server.grpc_address], capsys)
    assert code == 2 and "missing token" in err[-1], err  # the server refuses a run without one
    monkeypatch.setenv("DANNUCNET_TOKEN", TOKEN)
    _past_the_server(*_batch([str(project), "--server", server.grpc_address], capsys))


def test_an_untrained_model_on_the_server_is_warned_about(project, server, capsys, monkeypatch):
    monkeypatch.delenv("DANNUCNET_TOKEN", raising=False)
    code, err = _batch([str(project), "--server", server.grpc_address, "--token", TOKEN], capsys)
    assert UNTRAINED_WARNING.format(name="untrained") in err, err
    _past_the_server(code, err)


def test_settings_the_server_decides_are_said_to_be_ignored(project, server, capsys):
    """--device, --runtime and --batch-size run the network, which the server does: said, not silently dropped."""
    code, err = _batch([str(project), "--server", server.grpc_address, "--token", TOKEN, "--device", "cuda",
                        "--batch-size", "4"], capsys)
    assert "note: --device, --batch-size ignored: the server runs the model with its own settings" in err, err
    _past_the_server(code, err)
    code, err = _batch([str(project), "--server", server.grpc_address, "--token", TOKEN], capsys)
    assert not any("ignored" in line for line in err), err
