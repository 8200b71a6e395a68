"""The one log line format of every peel-fed message."""

from __future__ import annotations

from peel_fed.console import log


def test_log_prints_one_prefixed_line(capsys):
    log("pretraining LightGCN")
    assert capsys.readouterr().out == "[peel-fed] pretraining LightGCN\n"
