"""Tests of bench/mutations.py: every mutation still names one line of the library, and changes it."""
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutations  # noqa: E402


def test_every_mutation_names_one_line_of_the_library_and_leaves_valid_python_that_differs():
    source = mutations.LIBRARY.read_text()
    names = [name for name, _, _ in mutations.MUTATIONS]
    assert len(names) == len(set(names)) == 66
    for name, line, replacement in mutations.MUTATIONS:
        changed = mutations.mutated(source, line, replacement)  # (exits naming the line unless it occurs once)
        ast.parse(changed)
        differ = [(a, b) for a, b in zip(source.splitlines(), changed.splitlines()) if a != b]
        assert len(differ) == 1 and replacement in differ[0][1] and line in differ[0][0], name
    assert mutations.LIBRARY.read_text() == source  # nothing written


def test_an_unknown_mutation_is_refused(capsys):
    assert mutations.main(["no such"]) == 2
    assert capsys.readouterr().err == "error: no mutation named no such\n"
