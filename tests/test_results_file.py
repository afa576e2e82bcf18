"""benchmarks.results_file: a benchmark's section of RESULTS.md is replaced whole, the others kept."""
from benchmarks.results_file import replace_section


def test_a_section_is_replaced_whole_and_the_others_kept_one_blank_line_apart(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## A\n\nold a, line 1\nold a, line 2\n\n## B\n\nb\n")
    replace_section("## A\n\nnew a\n", results)
    assert results.read_text() == "# Benchmark results\n\n## A\n\nnew a\n\n## B\n\nb\n"
    replace_section("## B\n\nnew b\n\n\n", results)  # the last section, trailing blank lines trimmed
    assert results.read_text() == "# Benchmark results\n\n## A\n\nnew a\n\n## B\n\nnew b\n"
    replace_section("## C (1 x 2)\n\nc \\1 kept as written", results)  # appended; no regex replacement syntax
    assert results.read_text().endswith("## B\n\nnew b\n\n## C (1 x 2)\n\nc \\1 kept as written\n")
    replace_section("## A\n\nnewer a", results)
    assert results.read_text().startswith("# Benchmark results\n\n## A\n\nnewer a\n\n## B\n")


def test_a_missing_file_is_started(tmp_path):
    results = tmp_path / "RESULTS.md"
    replace_section("## A\n\na\n", results)
    assert results.read_text() == "# Benchmark results\n\n## A\n\na\n"
