"""The examples run end to end (each checks its own outputs and exits non-zero if not)."""

from __future__ import annotations

import demo


def test_demo_runs_and_checks_its_outputs(capsys):
    demo.main()
    printed = capsys.readouterr().out
    assert "Linen output == NNX output: True" in printed
    assert "logits identical: True" in printed
    assert printed.rstrip().endswith("demo passed")
