"""The house: no import circle among the package's modules (lazy imports inside functions
included), the layers of pyproject.toml's import contract kept, no module too long to read, and the
code's citations of the contracts pointing at docs/ARCHITECTURE.md's sections, inside the repository."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def circles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_circle():
    graph = grimp.build_graph("ktfast", "kernels", cache_dir=None)
    assert "kernels.edge_losses" in graph.modules  # the kernels are part of what is checked
    assert circles(graph) == []


# The kernels install as ktfast.kernels (setup.py's package_dir), which grimp cannot follow from the
# package folder: it reads them as the root `kernels`. So who imports them is checked here: only the
# engine, which keeps every path between the kernels and the floors below them one way.
KERNEL_USERS = ("engine",)


def test_only_the_engine_imports_the_kernels():
    users = set()
    for path in ROOT.joinpath("ktfast").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            if any(n == "ktfast.kernels" or n.startswith("ktfast.kernels.") for n in names):
                users.add(path.relative_to(ROOT / "ktfast").parts[0])
    assert users and users <= set(KERNEL_USERS), users


def test_the_kernels_install_as_ktfast_kernels():
    import ktfast.kernels

    assert Path(ktfast.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert not ROOT.joinpath("ktfast", "kernels").exists()  # no link: it breaks on Windows and in sdists


def test_the_import_contract_holds():
    run = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert "0 broken" in run.stdout


def test_ruff_finds_nothing():
    """pyproject.toml's ruff rules hold and the code is as ruff formats it (CI runs the same first)."""
    ruff = str(Path(sys.executable).with_name("ruff"))
    for args in (["check", "."], ["format", "--check", "."]):
        run = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:]


def test_no_module_is_longer_than_400_lines():
    sources = [*ROOT.joinpath("ktfast").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]
    long = {
        str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


# ---- citations of the contracts -----------------------------------------------------------------
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
# "docs/ARCHITECTURE.md §1, §8", "`docs/ARCHITECTURE.md` §1" or, where a line is short of room, "ARCHITECTURE §6".
CITATION = re.compile(r"ARCHITECTURE(?:\.md)?`? (§\d+(?:(?:, | and )§\d+)*)")
# The file the citations used to name, outside the repository (spelt in two parts, so that this file is no hit).
STALE = ("DESIGN" + " §", "shared/" + "DESIGN")


def cited_files() -> list[Path]:
    """The .py files of the project and README.md."""
    files = {
        p.resolve()
        for folder in ("ktfast", "kernels", "benchmarks", "tests", "examples")
        for p in ROOT.joinpath(folder).rglob("*.py")
    }
    return sorted(files) + [ROOT / "README.md"]


def architecture_sections(text: str) -> set[int]:
    """The numbers of the page's "## N. Title" sections."""
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, re.M)}


def bad_citations(files: list[Path], sections: set[int]) -> list[str]:
    """ "file:line: why" for every citation of the old file, and of a section the page does not have."""
    bad = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}"
            bad += [f"{where}: cites {stale!r}" for stale in STALE if stale in line]
            for cited in CITATION.findall(line):
                bad += [
                    f"{where}: no section {n} in docs/ARCHITECTURE.md"
                    for n in map(int, re.findall(r"\d+", cited))
                    if n not in sections
                ]
    return bad


def test_the_code_cites_sections_of_docs_architecture_that_exist():
    sections = architecture_sections(ARCHITECTURE.read_text())
    assert sections == set(range(1, 13))  # §1-§12, the numbering the citations were written against
    files = cited_files()
    assert ROOT / "ktfast" / "graph" / "__init__.py" in files and ROOT / "README.md" in files
    assert sum(len(CITATION.findall(p.read_text())) for p in files) >= 60  # the pattern still finds them
    assert bad_citations(files, sections) == []


def test_a_citation_of_a_missing_section_or_of_the_old_file_is_found(tmp_path):
    """The check itself: each kind of bad citation in a file is reported, the good ones are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Fine (docs/ARCHITECTURE.md §1, §8), fine (ARCHITECTURE §6).\n'
        f"Gone (docs/ARCHITECTURE.md §2, §{13}).\n"  # §{13}: this file cites no §13
        f'Old ({STALE[0]}2), old ({STALE[1]}.md).\n"""\n'
    )
    assert bad_citations([sample], set(range(1, 13))) == [
        f"{sample}:2: no section 13 in docs/ARCHITECTURE.md",
        f"{sample}:3: cites {STALE[0]!r}",
        f"{sample}:3: cites {STALE[1]!r}",
    ]
