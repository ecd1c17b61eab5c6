#!/usr/bin/env python
"""Execute the book's notebooks in order with papermill, each on a fresh kernel.

    python scripts/run_notebooks.py --profile tiny                 # into _build/book/ (make book)
    python scripts/run_notebooks.py --profile tiny --out ../book   # into another folder
    jupyter-book build _build/book -W                               # then build that copy
    python scripts/run_notebooks.py --profile cpu --in-place       # rewrite notebooks/ (make publish)

By default nothing tracked is written: the book's sources (_config.yml, _toc.yml,
references.bib, book/ with its drawn figures in book/figures/, _static/) are copied into the output
folder (_build/book/ unless ``--out`` says otherwise) and the executed notebooks are written to
OUT/notebooks/, so ``jupyter-book build OUT -W`` works on the copy. Only ``--in-place`` rewrites the committed
notebooks, which carry the published run. Results pass from one notebook to the next only
through the artifacts folder, OUT/artifacts/<profile> by default.

After each notebook, a note at the top of it says how it was made: profile, data, seed,
device, hardware and run time, read from papermill's metadata. The run stops at the first
notebook that fails (papermill saves it with the error in place) and exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import papermill
from nbclient.exceptions import CellTimeoutError

from syndiff_lib.notebook import BATCH_ENV

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "_build" / "book"  # git-ignored: `make book` writes here, never to tracked files
# Copied next to the executed notebooks; "book" whole, with book/figures/ (scripts/draw_figures.py
# draws them, the pages show them), and _static/ (the book's CSS), so that a build folder holds
# every file a page references.
BOOK_SOURCES = ("_config.yml", "_toc.yml", "references.bib", "book", "_static")
RUN_INFO_TAG = "run-info"  # the note this script writes; replaced on every run


def commit() -> str:
    """The repository's commit, short, with "+changes" if the checkout differs from it: read
    once, before the first notebook runs (an in-place run rewrites the notebooks as it goes)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+changes" if head and git("status", "--porcelain") else "")


def hardware() -> str:
    """One line: CPU model and cores, GPU if torch sees one, OS."""
    import torch  # late: argument errors should not wait for torch

    from syndiff_lib.train import cpu_model  # the one reader of the CPU's name, as results.json records it

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu_model()} ({os.cpu_count()} cores){gpu}; {platform.system()} {platform.release()}"


def describe_data(data: str | None) -> str:
    if data in (None, "", "toy"):
        return "the built-in toy dataset (`toy`)"
    return f"`{data}`"


def run_info_cell(nb, params: dict, machine: str) -> nbformat.NotebookNode:
    """A markdown note with what papermill recorded about this execution."""
    meta = nb.metadata.get("papermill", {})
    started = (meta.get("start_time") or "")[:16].replace("T", " ")
    seconds = meta.get("duration") or 0.0
    chosen = params.get("set", {})  # parameters given with -p that this notebook declares
    text = (
        "```{note}\n"
        f"**How this page was made.** Executed with papermill on {started} UTC in {seconds:.0f} s: "
        f"profile **{params['profile']}**, data {describe_data(params['data'])}, seed {params['seed']}, "
        f"device {params['device']}, on {machine}, at commit `{params['commit']}`. "
        + ("Set for this run: " + ", ".join(f"`{name}={json.dumps(value)}`" for name, value in chosen.items()) + ". "
           if chosen else "")
        + f"Every number and figure below comes from that run; `make book PROFILE=... SYNDIFF_DATA=...` "
        "reruns it (see the introduction).\n"
        "```"
    )
    cell = nbformat.v4.new_markdown_cell(text)
    cell.metadata["tags"] = [RUN_INFO_TAG]
    return cell


def stamp(path: Path, params: dict, machine: str) -> float:
    """Put the run-info note after the notebook's first (title) cell, collapse papermill's
    injected parameters; return the run time.

    Also drops the saved widget state: widgets need a live kernel, the book shows static
    figures beside them, and the state would load ipywidgets' JavaScript from a CDN.
    """
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)
    nb.cells = [c for c in nb.cells if RUN_INFO_TAG not in c.get("metadata", {}).get("tags", [])]
    nb.cells.insert(1, run_info_cell(nb, params, machine))
    for cell in nb.cells:  # papermill's copy of the parameters: boilerplate, collapsed in the book
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
    scrub_paths(nb, path.parent.parent)
    nbformat.write(nb, path)
    return float(nb.metadata.get("papermill", {}).get("duration") or 0.0)


def scrub_paths(nb, book: Path) -> None:
    """Write the book folder as "." and the home folder as "~" in papermill's metadata and in
    text outputs: saved notebooks are published, and the paths of this machine are nobody's business."""
    def scrub(text: str) -> str:
        return text.replace(str(book.resolve()) + "/", "./").replace(str(Path.home()), "~")

    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if isinstance(meta.get(key), str):
            meta[key] = scrub(meta[key])
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = scrub(output["text"])
            if "text/plain" in output.get("data", {}):
                output["data"]["text/plain"] = scrub(output["data"]["text/plain"])


def copy_book_sources(out: Path) -> None:
    """Copy BOOK_SOURCES into ``out``; a folder (book/, with book/figures/) replaces its old copy."""
    for name in BOOK_SOURCES:
        source, target = REPO / name, out / name
        if not source.exists():
            continue
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny", choices=["tiny", "cpu", "full", "full-random"])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None,
                       help=f"book folder to write (default: {DEFAULT_OUT.relative_to(REPO)}/ in this repository)")
    where.add_argument("--in-place", action="store_true",
                       help="rewrite the committed notebooks in notebooks/ (publishing: make publish)")
    parser.add_argument("--data", default=None, help="dataset folder (default: $SYNDIFF_DATA, else the toy dataset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--artifacts", default=None, help="default: OUT/artifacts/<profile>")
    parser.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 05,07 (needs earlier artifacts)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="one more parameter, e.g. -p ablation_minutes=6 (JSON values; passed only to "
                             "the notebooks whose parameters cell declares NAME)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per kernel (OMP_NUM_THREADS); default: torch's choice")
    parser.add_argument("--kernel", default="python3")
    parser.add_argument("--cell-timeout", type=int, default=None, metavar="SECONDS",
                        help="fail a notebook whose cell runs longer than this (default: no limit; a "
                             "hung kernel then hangs the run)")
    return parser.parse_args(argv)


def output_dir(args: argparse.Namespace) -> Path:
    """The book folder to write: the repository only with --in-place, else --out or DEFAULT_OUT.

    Raises ValueError for an --out that would rewrite the committed notebooks by accident
    (the repository itself, or its notebooks/ folder: notebooks go to OUT/notebooks/).
    """
    if args.in_place:
        return REPO
    out = Path(args.out).resolve() if args.out else DEFAULT_OUT
    if out == REPO:
        raise ValueError("--out is this repository: pass --in-place to rewrite the committed notebooks")
    if out == REPO / "notebooks":
        raise ValueError("--out is the book folder (notebooks go to OUT/notebooks/), not notebooks/ itself")
    return out


def parse_param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise SystemExit(f"error: --param wants NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # a plain string


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = output_dir(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    notebooks = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        wanted = set(args.only.split(","))
        notebooks = [nb for nb in notebooks if nb.name[:2] in wanted]
    if not notebooks:
        print("error: no notebooks to run", file=sys.stderr)
        return 2
    if out != REPO:
        out.mkdir(parents=True, exist_ok=True)
        copy_book_sources(out)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)

    # The kernels inherit this environment: no progress bars, no downloads, and OpenMP threads
    # that sleep instead of spinning while they wait: on a machine shared with other jobs,
    # spinning threads wait on each other and every step crawls.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ[BATCH_ENV] = "1"  # no reader: notebook.explore makes no widgets (see there)
    data = args.data or os.environ.get("SYNDIFF_DATA") or None
    parameters = {"profile": args.profile, "seed": args.seed, "device": args.device}
    if data not in (None, "", "toy"):
        # The kernels run in OUT/notebooks/: a relative folder is rewritten relative to it
        # (not made absolute, so no path of this machine lands in the saved notebooks).
        if not Path(data).is_dir():
            print(f"error: the data folder {data} does not exist", file=sys.stderr)
            return 2
        parameters["data"] = data if Path(data).is_absolute() else os.path.relpath(Path(data).resolve(), out / "notebooks")
    if args.artifacts:
        parameters["artifacts"] = str(Path(args.artifacts).resolve())
    extra = dict(parse_param(p) for p in args.param)
    info = parameters | {"data": data, "commit": commit()}
    machine = hardware()
    print(f"profile {args.profile}, data {data or 'toy'}, out {out}\nhardware: {machine}", flush=True)

    times, start = {}, time.time()
    for source in notebooks:
        target = out / "notebooks" / source.name
        print(f"{source.name} ...", end=" ", flush=True)
        t0 = time.time()
        declared = papermill.inspect_notebook(source)
        chosen = {name: value for name, value in extra.items() if name in declared}  # -p that it takes
        mine = parameters | chosen
        try:
            papermill.execute_notebook(
                source, target, parameters=mine, kernel_name=args.kernel, cwd=target.parent,
                progress_bar=False, request_save_on_cell_execute=False, execution_timeout=args.cell_timeout,
            )
        except (papermill.PapermillExecutionError, CellTimeoutError) as error:
            print(f"FAILED after {time.time() - t0:.0f} s\n{error}", file=sys.stderr)
            print(f"the failing notebook, with its error, is {target}", file=sys.stderr)
            return 1
        times[source.name] = round(stamp(target, info | {"set": chosen}, machine), 1)
        print(f"{times[source.name]:.0f} s", flush=True)

    total = time.time() - start
    summary = {"profile": args.profile, "data": data or "toy", "commit": info["commit"], "hardware": machine, "seconds": times,
               "total_seconds": round(total, 1), "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    artifacts = Path(args.artifacts) if args.artifacts else out / "artifacts" / args.profile
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "run_notebooks.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"all {len(times)} notebooks in {total:.0f} s; executed notebooks in {out / 'notebooks'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
