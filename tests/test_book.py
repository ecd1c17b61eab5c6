"""The book: notebook structure, committed outputs, glue references, and a warning-free build.

Fast tests read the committed files, and check that scripts/run_notebooks.py writes outside
the committed notebooks unless told --in-place. `test_committed_book_builds_without_warnings`
builds the book from the committed notebooks (seconds, no execution). The slow test executes
all seven notebooks in the tiny profile on the toy dataset into a temporary copy (minutes) and
builds that copy with -W: what CI runs, without rewriting tracked files.
"""

import ast
import importlib.util
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
    stray = [c.source[:60] for c in nb.cells if c.cell_type == "code" and "remove-output" not in tags(c)
             and any(WIDGET_VIEW in o.get("data", {}) for o in c.outputs)]
    assert not stray, f"{path.name}: widget output (progress bar?) in a cell the book shows: {stray}"
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size} bytes"


# ---- structure -------------------------------------------------------------------------------


def test_seven_ordered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


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
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--profile", "tiny",
                          "--out", str(out)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert git_status("notebooks/") == before, "executing into a copy rewrote tracked notebooks"
    for path in sorted((out / "notebooks").glob("*.ipynb")):
        check_executed_notebook(path)
    result = jupyter_book(out, out)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "WARNING" not in log, log[-3000:]
    assert not (REPO / "notebooks" / "artifacts").exists()
    times = json.loads((out / "artifacts" / "tiny" / "run_notebooks.json").read_text())
    assert len(times["seconds"]) == 7
