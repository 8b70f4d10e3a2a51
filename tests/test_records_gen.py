"""The shipped records.config and docs/records.md are exactly what the table generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from iocore.records.gen import REPO_ROOT, generated_files, main
from iocore.records.parser import RecordsConfig, load_records
from iocore.records.spec import RECORDS


def test_committed_files_match_the_table() -> None:
    for rel, text in generated_files().items():
        assert (REPO_ROOT / rel).read_text(encoding="utf-8") == text, (
            f"{rel} is stale; run python -m iocore.records.gen"
        )


def test_shipped_records_config_is_the_quick_start_defaults() -> None:
    rec = load_records(REPO_ROOT / "etc" / "tsproxy")
    assert rec.warnings == ()
    assert rec["proxy.config.http.server_ports"] == "8080 8443:ssl"
    assert rec["proxy.config.local_state_dir"] == "run"
    assert rec["proxy.config.log.logfile_dir"] == "log"
    assert rec.diff(RecordsConfig.from_values(rec.config_dir, {})) == []
    assert all(rec.line_of(spec.name) is not None for spec in RECORDS)  # every record is listed


def test_check_mode_reports_stale_files(tmp_path: Path) -> None:
    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "docs" / "records.md").write_text("old\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "iocore.records.gen", "--check", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 1
    assert "docs/records.md is out of date" in result.stderr
