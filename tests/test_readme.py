"""The README's generated tables are current (``python tools/readme_tables.py`` writes them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_are_generated_from_the_claims_the_tests_assert() -> None:
    check = subprocess.run([sys.executable, str(ROOT / "tools" / "readme_tables.py"), "--check"],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_claims_are_stated_at_the_default_settings() -> None:
    from propstore.config import RoutingSettings
    from tests import claims

    assert RoutingSettings().replica_deadline == claims.REPLICA_DEADLINE
    assert RoutingSettings().write_retry_time == claims.WRITE_RETRY_TIME
