"""The fault suite at CI scale (scripts/chaos.py --small, about 35 s).

It owns its redis-server (a free port, AOF everysec), so it never touches the
shared one; the figures it prints are checked here as well as by its exit status.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"
pytestmark = pytest.mark.slow


def test_chaos_small_loses_nothing_and_applies_nothing_twice():
    r = subprocess.run([sys.executable, str(SCRIPT), "--small", "--seed", "4"],
                       capture_output=True, text=True, timeout=180)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    fig = {m[0].strip(): m[1] for m in re.findall(r"^(\S[^\n]*?)\s{2,}(\S.*)$", out, re.M)}
    assert int(fig["projector kills survived"]) >= 5
    assert int(fig["Redis restarts survived"]) == 2
    assert int(fig["SIGSTOPs"]) == 2
    assert int(fig["CLIENT KILLs"].split()[0]) >= 5
    published = int(fig["events published"])
    assert published > 1000
    assert int(fig["events applied"]) + int(fig["dead-lettered"]) == published
    assert int(fig["dead-lettered"]) == int(fig["poison published"]) > 0
    assert fig["differences"] == "0" and fig["pending"] == "0"
    assert fig["published missing from log"] == "0" and fig["daemon crashes"] == "0"
    assert int(fig["tracks compared"]) > 100
    assert "Traceback" not in r.stderr
