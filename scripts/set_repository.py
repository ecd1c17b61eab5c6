"""Name the repository the book is published from, in the one place that holds it.

    python scripts/set_repository.py https://github.com/you/syndiff-book [--branch main]

``repository.url`` in ``_config.yml`` is the address: the launch buttons (Colab, Binder) link
to it. The notebooks' first cell installs the project on Colab from the same address, and a
notebook opened on Colab cannot read ``_config.yml`` (nothing is cloned yet), so this script
copies the address into every notebook's ``REPO_URL`` line. ``tests/test_book.py`` fails when
the two disagree. Only those lines change: outputs and everything else stay as they are.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
URL_IN_JSON = re.compile(r'(REPO_URL = \\")[^"\\]*(\\")')  # the line as the .ipynb (JSON) spells it
CONFIG_URL = re.compile(r"^(repository:\n(?:  .*\n)*?  url: ).*$", re.M)
CONFIG_BRANCH = re.compile(r"^(repository:\n(?:  .*\n)*?  branch: ).*$", re.M)


def set_repository(url: str, branch: str | None = None, root: Path = REPO) -> list[Path]:
    """Write ``url`` into _config.yml and every notebook; return the files changed."""
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise SystemExit(f"set_repository: {url!r} is not a GitHub repository address "
                         "(https://github.com/OWNER/NAME)")
    changed = []
    config = root / "_config.yml"
    text = config.read_text()
    new = CONFIG_URL.sub(lambda m: m.group(1) + url, text, count=1)
    if branch:
        new = CONFIG_BRANCH.sub(lambda m: m.group(1) + branch, new, count=1)
    if new == text and url not in text:
        raise SystemExit(f"set_repository: {config} has no repository.url to set")
    if new != text:
        config.write_text(new)
        changed.append(config)
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        # A line-level edit keeps the notebook's JSON exactly as it was elsewhere.
        text = path.read_text()
        new = URL_IN_JSON.sub(lambda m: m.group(1) + url + m.group(2), text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="https://github.com/OWNER/NAME")
    parser.add_argument("--branch", help="the branch the book is built from (default: keep _config.yml's)")
    args = parser.parse_args(argv)
    for path in set_repository(args.url, args.branch):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
