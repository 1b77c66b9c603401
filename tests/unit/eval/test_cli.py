"""`bigmodel eval --task ...`: misuse is a one-line error, before any checkpoint is read."""

from __future__ import annotations

import pytest

from bigmodel.cli.main import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "zeroshot_classification"], "--task zeroshot_classification needs --dataset DIR"),
        (["--task", "zeroshot_retrieval", "--dataset", "d", "--config", "c.yaml"], "--config and overrides apply"),
        (["--task", "zeroshot_retrieval", "--dataset", "d", "--train.steps=3"], "--config and overrides apply"),
    ],
)
def test_misuse_is_one_line(args, message, capsys):
    assert main(["eval", "no-such-run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
