"""The structured inventory (survey Appendix B / Table 10; §9.5 "structured inventory (CSV and JSON)")."""

from __future__ import annotations

import csv
import io
import json

import pytest

from stages.credit.inventory import (
    CSV_COLUMNS,
    InventoryRow,
    check_against_registry,
    filter_rows,
    load_inventory,
    load_registry_extras,
    render_table,
    to_csv,
    to_json,
)


@pytest.fixture(scope="module")
def rows() -> list[InventoryRow]:
    return load_inventory()


@pytest.fixture(scope="module")
def numbered(rows) -> list[InventoryRow]:
    return [r for r in rows if r.number is not None]


def by_number(rows, n) -> InventoryRow:
    (row,) = [r for r in rows if r.number == n]
    return row


def test_row_counts(rows, numbered):
    assert len(rows) == 51
    assert [r.number for r in numbered] == list(range(1, 48))
    background = [r for r in rows if r.number is None]
    assert [r.method for r in background] == ["Math-Shepherd", "OmegaPRM", "GRPO", "DeepSeek-R1"]
    assert all(r.type is None and r.is_background for r in background)
    assert len({r.method for r in rows}) == 51


def test_type_counts_match_note_on_classification(numbered):
    # "41 core CA methods (#1–35, #42–47) and 6 CA-adjacent enablers (#36–41)"
    core = [r.number for r in numbered if r.type == "C"]
    enablers = [r.number for r in numbered if r.type == "E"]
    assert core == list(range(1, 36)) + list(range(42, 48))
    assert enablers == list(range(36, 42))
    assert {r.type_label for r in numbered if r.type == "C"} == {"Core CA method"}
    assert {r.type_label for r in numbered if r.type == "E"} == {"CA-adjacent enabler"}


def test_group_and_setting_counts(rows, numbered):
    groups = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r.number)
    assert groups == {
        "Reasoning RL — Core CA Methods": list(range(1, 16)),
        "Agentic RL — Core CA Methods": list(range(16, 36)),
        "Agentic RL — CA-Adjacent Enablers": list(range(36, 42)),
        "Multi-Agent — Core CA Methods": list(range(42, 48)),
        "Background / Foundational (not counted in 47)": [None] * 4,
    }
    assert all(r.setting == ("R",) for r in numbered if r.number <= 15)
    assert all("A" in r.setting for r in numbered if 16 <= r.number <= 41)
    assert all(r.setting == ("M",) for r in numbered if r.number >= 42)
    assert [r.method for r in numbered if r.setting == ("A", "M")] == ["C3", "CCPO"]
    # 6 dedicated multi-agent papers (§6.2, §10)
    assert len([r for r in numbered if r.setting == ("M",)]) == 6
    assert len(filter_rows(numbered, setting="R")) == 15
    assert len(filter_rows(numbered, setting="A")) == 26
    assert len(filter_rows(numbered, setting="M")) == 8


def test_codes_and_labels_are_from_the_legend(rows):
    bl = {"G": "GRPO", "P": "PPO", "D": "DPO", "O": "ORM", "T": "TD"}
    ev = {"S": "strong empirical", "L": "limited but suggestive", "A": "primarily analytical"}
    for r in rows:
        assert set(r.setting) <= {"R", "A", "M"} and r.setting
        assert r.baseline_family is None or r.baseline_label == bl[r.baseline_family]
        assert r.evidence_label == ev[r.evidence]
        assert r.primary_benchmarks and all(b.strip() == b and b for b in r.primary_benchmarks)
        assert r.section.startswith("§")
        assert r.status in ("implemented", "planned", "not-applicable")
    assert [r.method for r in rows if r.baseline_family is None] == [
        "FinePO", "Math-Shepherd", "OmegaPRM", "GRPO", "DeepSeek-R1"]


def test_spot_checks_against_table_10(rows):
    gigpo = by_number(rows, 19)
    assert (gigpo.method, gigpo.type, gigpo.setting, gigpo.granularity, gigpo.methodology) == (
        "GiGPO", "C", ("A",), "Step", "MC (group)")
    assert (gigpo.baseline_family, gigpo.evidence, gigpo.primary_benchmarks) == ("G", "S", ("ALFWorld", "WebShop"))
    assert gigpo.full_name == "Group-in-Group Policy Optimization" and gigpo.section == "§5.3"

    pure = by_number(rows, 8)
    assert (pure.method, pure.granularity, pure.methodology, pure.baseline_family, pure.evidence) == (
        "PURE", "Step", "Min-form PRM", "G", "S")
    assert pure.primary_benchmarks == ("MATH-500", "AIME’24")

    sharp = by_number(rows, 45)
    assert (sharp.method, sharp.setting, sharp.granularity, sharp.methodology, sharp.evidence) == (
        "SHARP", ("M",), "Multi-Agent", "Shapley", "S")

    vine = by_number(rows, 1)
    assert (vine.method, vine.granularity, vine.methodology, vine.baseline_family) == ("VinePPO", "Token", "MC", "P")
    assert vine.section == "§3.1.1"

    tempo = by_number(rows, 7)
    assert (tempo.granularity, tempo.methodology, tempo.baseline_family, tempo.evidence) == ("Token/Seg", "Tree-TD", "P", "L")

    archer = by_number(rows, 16)
    assert (archer.granularity, archer.methodology, archer.baseline_family) == ("Turn", "TD (hierarchical)", "T")

    agentprm = by_number(rows, 21)
    assert (agentprm.methodology, agentprm.baseline_family, agentprm.primary_benchmarks) == (
        "TD+GAE", "O", ("WebShop", "TextCraft"))

    finepo = by_number(rows, 15)
    assert (finepo.granularity, finepo.methodology, finepo.baseline_family, finepo.primary_benchmarks) == (
        "Sub-step", "Fine PRM", None, ("Domain-specific (visual)",))
    assert finepo.status == "not-applicable" and "SketchVL" in finepo.status_reason

    adaptseg = by_number(rows, 41)
    assert (adaptseg.method, adaptseg.type, adaptseg.granularity) == ("AdaptSeg", "E", "Segment")

    drmas = by_number(rows, 47)
    assert (drmas.method, drmas.methodology, drmas.primary_benchmarks) == ("Dr. MAS", "Agent-wise Adv.", ("Math tasks",))

    (r1,) = [r for r in rows if r.method == "DeepSeek-R1"]
    assert (r1.granularity, r1.methodology, r1.primary_benchmarks) == ("Episode", "GRPO", ("AIME", "MATH", "code"))


#: Appendix B rows implemented in the registry (row number, registry name); None = background row
IMPLEMENTED = [(1, "vineppo"), (2, "red"), (3, "t_reg"), (4, "dpo_implicit"), (5, "spo"), (6, "scar"), (7, "tempo"),
               (8, "pure"), (9, "spro"), (10, "capo"), (11, "acpo"), (12, "hicra"), (13, "prl"), (14, "int"),
               (16, "archer"), (17, "stepagent"), (18, "poad"), (19, "gigpo"), (20, "sweet_rl"), (21, "agentprm"), (22, "mt_grpo"), (23, "turn_ppo"), (24, "grpo"), (25, "tarl"), (26, "itpo"), (27, "igpo"), (28, "carl"), (29, "istar"), (30, "pilotrl"), (31, "lare"), (32, "hcapo"), (33, "c3"), (34, "ccpo"), (35, "criticsearch"), (36, "spa"), (37, "lightning"), (38, "starpo"),
               (39, "scribe"),
               (40, "prs"), (41, "adaptseg"),
               (None, "grpo")]


def test_status_rules(rows):
    import stages.credit.methods  # noqa: F401  (registers the built-in methods)
    from stages.credit.registry import method_names

    implemented = [r for r in rows if r.status == "implemented"]
    assert [(r.number, r.registry_name) for r in implemented] == IMPLEMENTED
    assert {r.registry_name for r in implemented} <= set(method_names())
    for r in rows:
        if r.status == "planned":
            assert r.registry_name is None
            assert r.status_reason == "not implemented yet (issue 5/next catalogue issues)"
    assert [r.method for r in rows if r.status == "not-applicable"] == ["FinePO", "Math-Shepherd"]


def test_registry_extras():
    extras = load_registry_extras()
    assert [e["registry_name"] for e in extras] == ["rloo", "reinforce_pp", "reinforce_pp_baseline", "gae", "remax",
                                                     "oracle",
                                                     "uncertainty_branching"]
    for e in extras:
        assert e["method"] and e["reference"]
        if e["registry_name"] == "uncertainty_branching":
            assert e["reason"].startswith("a method of our own") and e["simplified"]
        elif e["registry_name"] == "oracle":
            assert e["reason"] == "benchmark instrument, not one of the 47 reviewed papers" and e["simplified"]
        else:
            assert e["reason"] == "episode-level baseline, not one of the 47 reviewed papers"


def test_filters(rows):
    token = filter_rows(rows, granularity="token")
    assert [r.method for r in token] == ["VinePPO", "RED", "T-REG", "From r to Q*", "TEMPO", "POAD"]
    assert [r.number for r in filter_rows(rows, granularity="SEGMENT")] == [5, 6, 41]
    assert [r.number for r in filter_rows(rows, methodology="counterfactual")] == [33, 34]
    assert [r.number for r in filter_rows(rows, setting="m", methodology="shapley")] == [45]
    assert [r.number for r in filter_rows(rows, setting="a", granularity="turn", methodology="implicit")] == [26]
    assert filter_rows(rows) == rows
    assert filter_rows(rows, setting="X") == []


def test_csv_round_trip(rows):
    text = to_csv(rows)
    records = list(csv.DictReader(io.StringIO(text)))
    assert len(records) == 51
    assert tuple(records[0].keys()) == CSV_COLUMNS
    for rec, row in zip(records, rows):
        assert rec["number"] == ("" if row.number is None else str(row.number))
        assert rec["method"] == row.method
        assert tuple(rec["setting"].split("/")) == row.setting
        assert tuple(rec["primary_benchmarks"].split("; ")) == row.primary_benchmarks
        assert rec["granularity"] == row.granularity and rec["methodology"] == row.methodology
        assert rec["baseline_family"] == (row.baseline_family or "")
        assert rec["status"] == row.status and rec["registry_name"] == (row.registry_name or "")
    c3 = next(rec for rec in records if rec["method"] == "C3")
    assert c3["setting"] == "A/M"


def test_json_round_trip(rows):
    data = json.loads(to_json(rows))
    assert len(data) == 51
    assert [InventoryRow.from_dict(d) for d in data] == rows
    assert data[18]["method"] == "GiGPO" and data[18]["setting"] == ["A"]


def test_render_table(rows):
    text = render_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + 51
    assert lines[0].split()[:3] == ["#", "Method", "Type"]
    gigpo = next(line for line in lines if "GiGPO" in line)
    assert gigpo.split()[:4] == ["19", "GiGPO", "C", "A"]
    grpo = next(line for line in lines if line.split()[:1] == ["GRPO"])
    assert "implemented (grpo)" in grpo
    # a row that departs from its paper on purpose says so
    for name in ("InT", "RED"):
        line = next(line for line in lines if line.split()[1:2] == [name])
        row = next(r for r in rows if r.method == name)
        assert row.simplified and f"implemented (simplified: {row.simplified}) ({row.registry_name})" in line


def test_methods_command_shows_simplified_statuses(capsys):
    from flows.cli import main

    assert main(["methods", "--setting", "R"]) in (0, None)
    out = capsys.readouterr().out
    assert "implemented (simplified: interventions are rolled out" in out and "implemented (simplified: step units" in out
    assert main(["methods", "--format", "csv"]) in (0, None)
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert next(r for r in records if r["method"] == "InT")["simplified"].startswith("interventions are rolled out")


def test_spo_scar_and_reinforce_pp_say_what_they_simplify(rows, capsys):
    """Issue 13: SPO-tree's continuations are not trained on; SCAR's game is the policy's answer
    likelihood over steps, not a reward model over spans; REINFORCE++'s KL is a loss term."""
    from flows.cli import main

    notes = {r.method: r.simplified for r in rows}
    assert "not trained on" in notes["SPO"] and "answer step" in notes["SCAR"]
    assert notes["VinePPO"] == "" and notes["TEMPO"] == ""  # faithful
    assert main(["methods", "--setting", "R"]) in (0, None)
    out = capsys.readouterr().out
    for name in ("SPO", "SCAR"):
        line = next(line for line in out.splitlines() if line.split()[1:2] == [name])
        assert f"implemented (simplified: {notes[name]})" in line
    extras = {e["registry_name"]: e for e in load_registry_extras()}
    assert "update.kl_coef" in extras["reinforce_pp"]["simplified"]


def test_registry_consistency():
    import stages.credit.methods  # noqa: F401  (registers the built-in methods)
    from stages.credit.registry import method_names

    # methods that tests register for themselves are named "test-..."; they are not the product's
    assert check_against_registry(load_inventory(), [m for m in method_names() if not m.startswith("test-")]) == []


def test_check_against_registry_reports_problems(rows):
    problems = check_against_registry(rows, ["rloo", "gae", "mystery"])
    assert any("'grpo' is not registered" in p for p in problems)
    assert any("'mystery'" in p for p in problems)
    assert not any("'rloo'" in p or "'gae'" in p for p in problems)
    planned = next(r for r in rows if r.status == "planned")
    broken = [InventoryRow.from_dict({**planned.to_dict(), "status_reason": ""})]
    assert check_against_registry(broken, [], extras=[]) == [
        f"#{planned.number} {planned.method}: status 'planned' without a status_reason"]
