"""CLI: `creditflow methods` (Appendix B inventory) and `creditflow recommend` (decision tree)."""

import csv
import io
import json

from flows.cli import main


def test_methods_table_filters_and_formats(capsys):
    assert main(["methods", "--setting", "M"]) == 0
    out = capsys.readouterr().out
    assert "SHARP" in out and "VinePPO" not in out
    assert main(["methods", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 51 and any(r["registry_name"] == "grpo" and r["status"] == "implemented" for r in rows)
    assert main(["methods", "--granularity", "turn", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data and all("turn" in r["granularity"].lower() for r in data)
    assert main(["methods"]) == 0  # the full table also lists the registry extras with their status
    out = capsys.readouterr().out
    assert "Registry methods beyond the inventory" in out
    assert any(line.split()[0] == "oracle" and "implemented (simplified:" in line for line in out.splitlines() if line.strip())


def test_recommend_from_fields_and_file(tmp_path, capsys):
    assert main(["recommend", "setting=agentic", "turns=60", "env_reset_cheap=false"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[1] == "hcapo"
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"setting": "multi-agent", "num_agents": 3}))
    assert main(["recommend", "--profile", str(profile), "--top", "2"]) == 0
    assert "m-grpo" in capsys.readouterr().out
    assert main(["recommend", "colour=blue"]) == 2
    assert "unknown task-profile key 'colour'" in capsys.readouterr().err
