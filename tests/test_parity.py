"""Inference parity: the code reproduces the outputs stored in tests/parity/fixture/ for a
seeded model on four phantom films (floats to 1e-5; levels, grades and names exactly).

The fixture was written before the model-bundle redesign (tests/parity/make_fixture.py); a
change that alters a number on purpose updates it in a commit of its own that says why."""
from tests.parity.compare import compare_with_fixture
from tests.parity.run import run_parity_model


def test_inference_reproduces_the_parity_fixture(tmp_path):
    out = run_parity_model(tmp_path)
    problems = compare_with_fixture(out)
    assert not problems, f"{len(problems)} difference(s) from the parity fixture:\n" + "\n".join(problems[:20])


def test_the_comparison_sees_a_changed_number_and_a_changed_grade(tmp_path):
    out = run_parity_model(tmp_path)
    csv = out / "vertebrae.csv"
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("p_fracture")] = str(float(row[header.index("p_fracture")]) + 1e-3)
    grade_row = next(k for k, line in enumerate(lines[1:], start=1) if line.split(",")[header.index("genant_grade")])
    cells = lines[grade_row].split(",")
    g = header.index("genant_grade")
    cells[g] = "2" if cells[g] != "2" else "1"
    lines[1], lines[grade_row] = ",".join(row), ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    problems = compare_with_fixture(out)
    assert any("p_fracture" in p for p in problems) and any("genant_grade" in p for p in problems)
