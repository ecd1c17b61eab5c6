"""The book: notebook structure, code that fits the page's column, committed outputs, glue
references, no typed numbers in the prose, the publishing workflow, and a warning-free build.

Fast tests read the committed files, and check that scripts/run_notebooks.py writes outside
the committed notebooks unless told --in-place. `test_committed_book_builds_without_warnings`
builds the book from the committed notebooks (seconds, no execution), as the publishing
workflow (.github/workflows/book.yml) does. The slow test executes every notebook in the tiny
profile on the toy dataset into a temporary copy (minutes) and builds that copy with -W: what
CI runs, without rewriting tracked files.
"""

import ast
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BOOK_PAGES = sorted((REPO / "book").glob("*.md"))
PARAMETERS = {"profile", "data", "seed", "device", "artifacts"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
MAX_NOTEBOOK_BYTES = 2_000_000  # "no megabytes of output in saved notebooks"
GLUE_TEXT = re.compile(r"\{glue:text\}`([^`:]+)::([A-Za-z0-9_]+)(?::[^`]*)?`")
GLUE_DIRECTIVE = re.compile(r"```\{glue\} ([A-Za-z0-9_]+)\n:doc: ([^\n]+)\n")


def config() -> dict:
    return yaml.safe_load((REPO / "_config.yml").read_text())


def read(path: Path):
    return nbformat.read(path, as_version=4)


def tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def glued_keys(nb) -> set[str]:
    """The keys a notebook's outputs glue (myst_nb.glue stores them under metadata.scrapbook)."""
    return {o["metadata"]["scrapbook"]["name"] for cell in nb.cells if cell.cell_type == "code"
            for o in cell.outputs if "scrapbook" in o.get("metadata", {})}


def check_executed_notebook(path: Path) -> None:
    """An executed notebook: no error outputs, a run-info note, no stray widgets, modest size."""
    nb = read(path)
    assert "papermill" in nb.metadata, f"{path.name} was not executed by papermill"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: error output {errors[0].get('ename')}: {errors[0].get('evalue')}"
    notes = [c for c in nb.cells if "run-info" in tags(c)]
    assert len(notes) == 1 and "profile" in notes[0].source, f"{path.name}: no 'How this page was made' note"
    assert "at commit `" in notes[0].source, f"{path.name}: the note does not say which commit made the page"
    hidden = ("remove-output", "remove-cell")  # either keeps a widget out of the static book
    stray = [c.source[:60] for c in nb.cells if c.cell_type == "code" and not set(hidden) & set(tags(c))
             and any(WIDGET_VIEW in o.get("data", {}) for o in c.outputs)]
    assert not stray, f"{path.name}: widget output (progress bar?) in a cell the book shows: {stray}"
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size} bytes"


# ---- structure -------------------------------------------------------------------------------


def test_eight_ordered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07", "08"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_colab_cell_then_one_parameters_cell(path):
    nb = read(path)
    code = [c for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in tags(c)]
    assert "google.colab" in code[0].source, "the first code cell installs the project on Colab"
    assert "hide-cell" in tags(code[0]), "boilerplate is collapsed in the book"
    url = re.search(r'REPO_URL = "([^"]+)"', code[0].source).group(1)
    assert url == config()["repository"]["url"], "REPO_URL must equal repository.url in _config.yml"
    parameter_cells = [c for c in nb.cells if "parameters" in tags(c)]
    assert len(parameter_cells) == 1 and parameter_cells[0] is code[1]
    assigned = {t.id for node in ast.parse(parameter_cells[0].source).body
                for t in getattr(node, "targets", [])}
    assert PARAMETERS <= assigned
    assert 'profile = "tiny"' in parameter_cells[0].source


def test_set_repository_writes_the_one_address_everywhere(tmp_path):
    """scripts/set_repository.py: _config.yml and every notebook's Colab cell get the address;
    nothing else in a notebook changes; a malformed address is refused."""
    shutil.copy(REPO / "_config.yml", tmp_path / "_config.yml")
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns("artifacts"))
    spec = importlib.util.spec_from_file_location("set_repository", REPO / "scripts" / "set_repository.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    url = "https://github.com/someone/syndiff-book"
    changed = module.set_repository(url, root=tmp_path)
    assert len(changed) == 1 + len(NOTEBOOKS)
    assert yaml.safe_load((tmp_path / "_config.yml").read_text())["repository"]["url"] == url
    for path in NOTEBOOKS:
        before, after = read(path), nbformat.read(tmp_path / "notebooks" / path.name, as_version=4)
        assert f'REPO_URL = "{url}"' in after.cells[[c.cell_type for c in after.cells].index("code")].source
        assert [c.outputs for c in before.cells if c.cell_type == "code"] == \
            [c.outputs for c in after.cells if c.cell_type == "code"]
    with pytest.raises(SystemExit, match="not a GitHub repository"):
        module.set_repository("http://example.org/x", root=tmp_path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_sets_up_with_the_library_helper(path):
    """One hidden setup cell calls syndiff_lib.notebook.setup; no notebook imports the command line."""
    code = [c for c in read(path).cells if c.cell_type == "code"]
    setups = [c for c in code if "ctx = setup(profile, data, seed, device, artifacts)" in c.source]
    assert len(setups) == 1 and "hide-cell" in tags(setups[0]), "boilerplate is collapsed in the book"
    assert setups[0].source.startswith("from syndiff_lib.notebook import setup"), "first: progress bars off"
    assert not [c.source[:60] for c in code if "syndiff_lib.cli" in c.source or "get_profile(" in c.source]


def test_toc_lists_every_notebook_and_page_exactly_once():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = [toc["root"]] + [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    assert len(files) == len(set(files))
    expected = {f"notebooks/{p.stem}" for p in NOTEBOOKS} | {f"book/{p.stem}" for p in BOOK_PAGES}
    assert set(files) == expected


def test_config_renders_saved_outputs_and_excludes_build_folders():
    cfg = config()
    assert cfg["execute"]["execute_notebooks"] == "off"
    assert {".venv", "_build", "artifacts", ".cache"} <= set(cfg["exclude_patterns"])
    assert cfg["launch_buttons"]["colab_url"].startswith("https://colab.research.google.com")
    assert cfg["launch_buttons"]["binderhub_url"]


def test_book_glue_references_name_keys_the_notebooks_glue():
    """Every number pasted into book/*.md is glued by the notebook it names (else -W fails late)."""
    missing = []
    for page in BOOK_PAGES:
        text = page.read_text()
        refs = [(doc, key) for doc, key in GLUE_TEXT.findall(text)]
        refs += [(doc, key) for key, doc in GLUE_DIRECTIVE.findall(text)]
        for doc, key in refs:
            notebook = (page.parent / doc).resolve()
            assert notebook.exists(), f"{page.name}: {doc} does not exist"
            if "papermill" in read(notebook).metadata and key not in glued_keys(read(notebook)):
                missing.append(f"{page.name}: {doc}::{key}")
    assert not missing, missing


def test_book_figures_exist():
    """Every figure a page shows is a file in the repository (drawn by scripts/draw_figures.py)."""
    missing = [f"{page.name}: {path}" for page in BOOK_PAGES
               for path in re.findall(r"^```\{figure\} (\S+)", page.read_text(), re.M)
               if not (page.parent / path).exists()]
    assert not missing, missing


# ---- code fits the book's column -------------------------------------------------------------
CODE_WIDTH = 80  # characters a code block of the rendered book shows before it scrolls sideways (_static/book.css)
MAGIC = re.compile(r"^(\s*)[%!].*$", re.M)  # an IPython magic or shell line: not Python


def shown_sources(path: Path) -> list[tuple[int, object]]:
    """(cell index, object) for every library object a notebook prints with inspect.getsource,
    found by reading its code: the argument names something a cell imported from syndiff_lib
    (``training_loss``, ``viz.wrap_lines``, ``SynDiffPipeline.__call__``). An argument that is
    neither that nor the notebook's own function or class fails: the test could not check it."""
    trees = [(i, ast.parse(MAGIC.sub(r"\1pass", c.source))) for i, c in enumerate(read(path).cells)
             if c.cell_type == "code"]
    imported, own = {}, set()  # imported: name in the notebook -> (module, attributes)
    for _, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("syndiff_lib"):
                imported.update({a.asname or a.name: (node.module, [a.name]) for a in node.names})
            elif isinstance(node, ast.Import):
                imported.update({a.asname or a.name.split(".")[0]: (a.name if a.asname else a.name.split(".")[0], [])
                                 for a in node.names if a.name.split(".")[0] == "syndiff_lib"})
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                own.add(node.name)
    shown = []
    for index, tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if called != "getsource" or not node.args:
                continue
            attributes, target = [], node.args[0]
            while isinstance(target, ast.Attribute):
                attributes.insert(0, target.attr)
                target = target.value
            name = getattr(target, "id", None)
            if name in own:
                continue  # the notebook's own code: its cell is checked line by line
            assert name in imported, f"{path.name}, cell {index}: cannot tell which object getsource prints"
            module, first = imported[name]
            obj = importlib.import_module(module)
            for attribute in first + attributes:  # a submodule (``viz``) may not be imported yet
                obj = getattr(obj, attribute) if hasattr(obj, attribute) else \
                    importlib.import_module(f"{obj.__name__}.{attribute}")
            shown.append((index, obj))
    return shown


def test_code_lines_fit_the_book_column():
    """No line of a code cell (hidden and boilerplate ones too: a reader can open them), nor of a
    library object a notebook prints with inspect.getsource, is wider than CODE_WIDTH: a wider
    line scrolls sideways in the rendered book and its end goes unread."""
    too_wide = []
    for path in NOTEBOOKS:
        for index, cell in enumerate(read(path).cells):
            if cell.cell_type == "code":
                too_wide += [f"{path.name}, cell {index}, line {n} ({len(line)} chars): {line.strip()}"
                             for n, line in enumerate(cell.source.split("\n"), start=1) if len(line) > CODE_WIDTH]
        for index, obj in shown_sources(path):
            name = f"{obj.__module__}.{obj.__qualname__}" if hasattr(obj, "__qualname__") else obj.__name__
            too_wide += [f"{path.name}, cell {index} prints {name}: its line {n} ({len(line)} chars): {line.strip()}"
                         for n, line in enumerate(inspect.getsource(obj).splitlines(), start=1)
                         if len(line) > CODE_WIDTH]
    assert not too_wide, f"lines over {CODE_WIDTH} characters:\n" + "\n".join(too_wide)


# ---- numbers in the prose --------------------------------------------------------------------
# A number of ours on a book page is glued from an executed notebook, never typed: a typed one
# goes stale the day a notebook is rerun. The paper's own numbers are the exception, and each
# page lists the ones it quotes, with where in the paper they are from. The list is per page:
# a number allowed on the page that quotes the paper's Table 1 is not allowed anywhere else.
PAPER_NUMBERS = {
    "intro.md": {
        "96.0": "Abstract and Table 1: SynDiff's Dice on CVC-ClinicDB",
    },
    "reproducing.md": {
        "96.0": "Table 1 and Table 2: SynDiff's Dice (+ Text-guided augmentation)",
        "92.9": "Table 1: SynDiff's IoU",
        "0.3": "Table 1: the std of SynDiff's Dice over 5 folds",
        "0.5": "Table 1: the std of SynDiff's IoU",
        "7.2": "Table 1: SynDiff's HD95 (mm)",
        "1.1": "Table 1: the std of SynDiff's HD95",
        "91.1": "Table 1: SynDiff's NSD",
        "1.0": "Table 1: the std of SynDiff's NSD",
        "96.1": "Table 2: + Multi-step inference (T = 50), Dice",
        "2.3": "Sec. 4.4: text-guided augmentation gives +2.3 % Dice",
        "93.7": "Tables 2 and 3: Baseline (real data only) / None, Dice",
        "94.8": "Tables 2 and 3: traditional augmentation, Dice",
        "95.2": "Table 2: frozen vision encoder; Table 3: GAN-based, Dice",
        "94.1": "Table 3: Text-guided (20), Dice",
        "95.1": "Table 3: Text-guided (50), Dice",
        "95.6": "Table 3: Text-guided (200), Dice",
        "0.8": "Sec. 4.4: the trainable encoder gives +0.8 % over frozen",
        "95.4": "Table 2: noise loss only, Dice",
        "0.08": "Table 4: SynDiff's inference time (s)",
        "1.8": "Table 4: Diff-Trans's inference time (s)",
    },
    "metrics.md": {
        "96.0": "Table 1: SynDiff's Dice",
        "92.9": "Table 1: SynDiff's IoU",
        "96.1": "Table 2: + Multi-step inference (T = 50), Dice",
    },
    "single-step.md": {
        "96.0": "Table 2: one step, Dice",
        "96.1": "Table 2: + Multi-step inference (T = 50), Dice",
    },
}
PAPER_TEXT = REPO.parent / "shared" / "paper" / "syndiff-paper.txt"  # beside the checkout, where there is one

# Directives whose body is prose (checked); every other fenced block is code or data (not checked).
PROSE_DIRECTIVES = {"figure", "note", "warning", "tip", "important", "caution", "attention", "danger", "error",
                    "hint", "seealso", "admonition", "margin", "sidebar", "epigraph", "dropdown", "topic",
                    "list-table", "table", "card", "tab-item"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,}|:{3,})\s*(?:\{([\w:-]+)\})?")
OPTION_LINE = re.compile(r"^\s*:[\w-]+:")  # a directive's option, e.g. ":width: 80%"
NOT_PROSE = [  # spans that are not prose numbers, in the order they are blanked out
    re.compile(r"\$\$.*?\$\$", re.S),  # display math
    re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.S),  # amsmath environments
    re.compile(r"\$[^$\n]+(?:\n[^$\n]+)*?\$"),  # inline math
    re.compile(r"\{[\w:.-]+\}(`+).*?\1", re.S),  # roles: {glue:text}, {cite}, {doc}, ...
    re.compile(r"(`+).+?\1", re.S),  # code
    re.compile(r"<!--.*?-->", re.S),  # comments
    re.compile(r"\]\([^)\s]*\)"),  # link targets
    re.compile(r"<?https?://[^\s>)]+>?"),  # addresses
    re.compile(r"[\w./-]*\w\.(?:svg|png|jpe?g|gif|ipynb|md|json|jsonl|ya?ml|py|txt|bib|mp4|csv|safetensors|onnx|"
               r"html|sh|tiff?|zip)\b"),  # file names
    re.compile(r"\b(?:Sec|Secs|Section|Sections|§|Eq|Eqs|Equation|Equations|Fig|Figs|Figure|Figures|Table|Tables|"
               r"Appendix|Chapter)\.?\s*\d+(?:\.\d+)*(?:\s*(?:,|and|&|–|-|to)\s*\d+(?:\.\d+)*)*"),  # "Sec. 4.1, 4.2"
    re.compile(r"^#{1,6}[ \t]+\d+(?:\.\d+)*\.?(?=\s)", re.M),  # a heading's own section number
    re.compile(r"\bv\d+(?:\.\d+)+\b"),  # versions, written v1.5
    re.compile(r"\b(?:19|20)\d\d\b"),  # years
]
DECIMAL = re.compile(r"(?<![\w.])\d*\.\d+(?:\.\d+)*(?!\w)")


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))  # same length, same lines: line numbers stay right


def prose_of(text: str) -> str:
    """The page's prose: fenced code and data blocks, directive options, math, roles (glue,
    citations, cross-references), code, links, file names, section numbers, versions and
    years blanked out (see bare_numbers)."""
    lines, fences = [], []  # fences: the open blocks, (fence, is prose)
    for line in text.split("\n"):
        m = FENCE.match(line)
        stripped = line.strip()
        if fences and m and m.group(2) is None and stripped == stripped[0] * len(stripped) \
                and stripped[0] == fences[-1][0][0] and len(stripped) >= len(fences[-1][0]):
            fences.pop()  # the block closes
            lines.append("")
            continue
        inside_code = any(not prose for _, prose in fences)
        if m and not inside_code:
            fences.append((m.group(1), (m.group(2) or "") in PROSE_DIRECTIVES))
            lines.append("")  # the fence line: a directive's name and argument (a file name)
        elif inside_code or (fences and OPTION_LINE.match(line)):
            lines.append("")
        else:
            lines.append(line)
    prose = "\n".join(lines)
    for pattern in NOT_PROSE:
        prose = pattern.sub(_blank, prose)
    return prose


def bare_numbers(text: str) -> list[tuple[int, str]]:
    """(line, number) for every bare decimal number in a book page's prose.

    A bare decimal number is one with a decimal point (``25.7``, ``0.08``, ``.5``) written in
    the prose itself: in paragraphs, headings, lists, tables and the captions and bodies of
    prose directives (figures, notes, admonitions). These are what results look like, and a
    result typed by hand is how a page comes to disagree with its notebooks. Not prose
    numbers: anything in a ``{glue:...}`` role (pasted from a notebook) or any other role
    (``{cite}``, ``{doc}``, ``{numref}``), math (``$...$``, ``$$...$$``, amsmath), code spans
    and fenced code or data blocks (``{glue}``, ``{bibliography}``, code), directive options
    (``:width: 80%``), link targets and addresses, file names (``fig2.png``), references to
    the paper's sections, equations, figures and tables (``Sec. 4.1, 4.2``, ``Table 2``), a
    heading's own section number, versions written ``v1.5`` and years. Integers are counts,
    sizes and settings (5 folds, 612 frames, 50 steps, 256 × 256), not checked. A number
    with more than one point (``4.1.2``) is a section or a version, not checked.
    """
    found = []
    for number, line in enumerate(prose_of(text).split("\n"), start=1):
        found += [(number, m.group(0)) for m in DECIMAL.finditer(line) if m.group(0).count(".") == 1]
    return found


def test_bare_numbers_finds_typed_results_and_nothing_else():
    page = """# Results

Our Dice is 25.7 %, IoU .61; see Sec. 4.1, 4.2 and Table 2 (Eq. 3), SD v1.5, 2024, 5 folds.
Pasted: {glue:text}`../notebooks/05_evaluation.ipynb::test_dice:.1%`, math $t = 0.5$, code `0.18215`,
[a link](https://example.org/v/1.5) and `fig2.png`, {cite}`syndiff`.

```{figure} figures/architecture.svg
:width: 80.5%

A caption with 3.14 in it.
```

```python
x = 0.25
```

$$
\\alpha = 0.9
$$
"""
    assert bare_numbers(page) == [(3, "25.7"), (3, ".61"), (10, "3.14")]


@pytest.mark.parametrize("page", BOOK_PAGES, ids=lambda p: p.name)
def test_book_page_has_no_bare_decimal_numbers(page):
    """Every decimal number in a page's prose is glued, or is one the page quotes from the paper."""
    allowed = PAPER_NUMBERS.get(page.name, {})
    lines = page.read_text().split("\n")
    typed = [f"{page.name}:{n}: {number} in {lines[n - 1].strip()!r}" for n, number in bare_numbers(page.read_text())
             if number not in allowed]
    assert not typed, "typed numbers (glue them from a notebook, or list the paper's in PAPER_NUMBERS):\n" + \
        "\n".join(typed)


def test_paper_numbers_are_quoted_where_listed_and_are_the_papers():
    """Each listed number appears bare on its page (an unused entry would let a number in
    unnoticed) and, where the paper's text is beside the checkout, in the paper."""
    unused = [f"{name}: {number}" for name, numbers in PAPER_NUMBERS.items() for number in numbers
              if not (REPO / "book" / name).exists()
              or number not in {n for _, n in bare_numbers((REPO / "book" / name).read_text())}]
    assert not unused, f"listed in PAPER_NUMBERS but not on the page: {unused}"
    if not PAPER_TEXT.exists():
        pytest.skip("the paper's text is not beside this checkout")
    paper = PAPER_TEXT.read_text()
    not_in_paper = [f"{name}: {number} ({source})" for name, numbers in PAPER_NUMBERS.items()
                    for number, source in numbers.items()
                    if not re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", paper)]
    assert not not_in_paper, f"not the paper's numbers: {not_in_paper}"


# ---- the runner writes outside the committed notebooks ---------------------------------------


def runner():
    """scripts/run_notebooks.py as a module (its argument parsing; nothing is executed)."""
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_writes_a_build_folder_by_default_and_the_notebooks_only_in_place(tmp_path):
    run = runner()
    default = run.output_dir(run.parse_args(["--profile", "tiny"]))
    assert default != REPO and default != REPO / "notebooks"
    assert default == REPO / "_build" / "book" and "_build" in config()["exclude_patterns"]
    assert run.output_dir(run.parse_args(["--out", str(tmp_path / "book")])) == tmp_path / "book"
    assert run.output_dir(run.parse_args(["--in-place"])) == REPO
    for out in (REPO, REPO / "notebooks"):
        with pytest.raises(ValueError):
            run.output_dir(run.parse_args(["--out", str(out)]))
    with pytest.raises(SystemExit):
        run.parse_args(["--in-place", "--out", str(tmp_path)])


def test_the_run_info_note_names_the_parameters_set_for_the_run():
    """A page made with, say, reuse_run=true says so in its note: a reader must know that its
    models were not trained by the run the note describes."""
    run, nb = runner(), nbformat.v4.new_notebook()
    params = {"profile": "cpu", "data": "data", "seed": 0, "device": "cpu", "commit": "abc1234"}
    plain = run.run_info_cell(nb, params, "a CPU").source
    assert "at commit `abc1234`" in plain and "Set for this run" not in plain
    assert "Set for this run: `reuse_run=true`." in run.run_info_cell(nb, params | {"set": {"reuse_run": True}}, "a CPU").source


def test_runner_copies_the_book_sources_with_their_figures(tmp_path):
    """A build folder gets every file of book/ (the pages and book/figures/), _config.yml,
    _toc.yml and references.bib, so `jupyter-book build OUT` finds what the pages reference."""
    runner().copy_book_sources(tmp_path)
    expected = [p.relative_to(REPO) for p in (REPO / "book").rglob("*") if p.is_file()]
    assert [p for p in expected if not (tmp_path / p).is_file()] == []
    assert any(p.parts[:2] == ("book", "figures") for p in expected), "book/figures/ holds the drawn figures"
    for name in ("_config.yml", "_toc.yml", "references.bib", "_static/book.css"):
        assert (tmp_path / name).read_bytes() == (REPO / name).read_bytes()


def test_publishing_workflow_builds_the_committed_notebooks_without_executing_them():
    """The GitHub Pages workflow publishes what the committed notebooks hold: it builds the book
    from the repository (execute_notebooks is off) and never runs papermill or `make book`."""
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "book.yml").read_text())
    steps = [step for job in workflow["jobs"].values() for step in job.get("steps", [])]
    commands = "\n".join(step.get("run", "") for step in steps)
    assert "jupyter-book build . -W" in commands
    assert "run_notebooks" not in commands and "make book" not in commands and "papermill" not in commands
    assert any(step.get("uses", "").startswith("actions/deploy-pages") for step in steps)
    assert config()["execute"]["execute_notebooks"] == "off"


def test_default_build_folder_is_ignored_by_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "_build/book/notebooks/01_data.ipynb"], cwd=REPO)
    assert ignored.returncode == 0, "_build/ must stay in .gitignore: make book writes there"


def git_status(folder: str) -> str | None:
    """`git status --porcelain FOLDER`, or None where there is no git checkout to ask."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    return subprocess.run(["git", "status", "--porcelain", folder], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout


# ---- the committed outputs -------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_carries_a_clean_run(path):
    check_executed_notebook(path)


def jupyter_book(source: Path, output: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(source), "-W", "--keep-going",
               "--path-output", str(output)]
    return subprocess.run(command, capture_output=True, text=True, cwd=source)


def test_committed_book_builds_without_warnings(tmp_path):
    result = jupyter_book(REPO, tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "WARNING" not in log, log[-3000:]
    assert (tmp_path / "_build" / "html" / "notebooks" / "05_evaluation.html").exists()


# ---- the whole run, as CI does it ------------------------------------------------------------


@pytest.mark.slow
def test_tiny_book_executes_and_builds_without_warnings(tmp_path):
    """Execute every notebook (tiny, toy data) into a temporary copy and build it with -W."""
    env = os.environ | {"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SYNDIFF_DATA", None)  # the toy dataset, whatever the machine has
    out = tmp_path / "book"
    before = git_status("notebooks/")
    # A cell limit far above any tiny cell: a kernel that hangs fails the test instead of CI.
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--profile", "tiny",
                          "--out", str(out), "--cell-timeout", "900"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert git_status("notebooks/") == before, "executing into a copy rewrote tracked notebooks"
    for path in sorted((out / "notebooks").glob("*.ipynb")):
        check_executed_notebook(path)
    result = jupyter_book(out, out)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "WARNING" not in log, log[-3000:]
    assert not (REPO / "notebooks" / "artifacts").exists()
    times = json.loads((out / "artifacts" / "tiny" / "run_notebooks.json").read_text())
    assert len(times["seconds"]) == len(NOTEBOOKS)
