"""Course plumbing: the repository address, "Open in Colab" links and each notebook's setup cell.

>>> COURSE_REPO below is the ONE place that names the public repository. <<<
It is not decided yet, so it holds a placeholder. To publish: set it to "owner/name" and run
    python -m utils.course
which rewrites the setup cell of every notebook and the Colab badges in README.md.
`tests/test_course.py` fails while they are out of date.
"""
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

COURSE_REPO = "OWNER/REPO"  # placeholder: the GitHub "owner/name" of the course, once decided
BRANCH = "main"

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# Every notebook's first code cell (the markdown cell above it says what it does): it makes utils/
# importable from the clone the notebook is in, or on Colab from a fresh clone, and otherwise says
# what to do. At most 6 lines; the rest of the work is in setup() below.
SETUP_CELL = '''\
import pathlib, subprocess, sys; here = pathlib.Path.cwd()
ROOT = next((p for p in (here, *here.parents, here / "moe-course") if (p / "utils" / "course.py").is_file()), None)
if ROOT is None and "google.colab" in sys.modules:
    subprocess.run(["git", "clone", "-q", "--depth=1", "https://github.com/{repo}", str(ROOT := here / "moe-course")], check=True)
elif ROOT is None: raise FileNotFoundError("course not found: clone https://github.com/{repo}, open this notebook inside it")
sys.path.insert(0, str(ROOT)); from utils.course import setup; FIGURES = setup(ROOT)'''


def setup(root):
    """The rest of every notebook's setup cell: install what Colab lacks (tiktoken; it has torch
    and matplotlib) and return the folder the notebooks write their figures to."""
    if importlib.util.find_spec("tiktoken") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "tiktoken"], check=True)
    return pathlib.Path(root) / "figures"


def setup_cell_source(repo=COURSE_REPO):
    return SETUP_CELL.format(repo=repo)


def colab_url(notebook_name, repo=COURSE_REPO):
    return f"https://colab.research.google.com/github/{repo}/blob/{BRANCH}/notebooks/{notebook_name}"


def colab_badge(notebook_name, repo=COURSE_REPO):
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(notebook_name, repo)})"


def notebook_paths():
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def solution_paths():
    return sorted((NOTEBOOKS / "solutions").glob("*.ipynb"))


def sync(check=False):
    """Rewrite (or, with check=True, only list) the notebooks and README lines that are out of date."""
    stale = []
    for path in notebook_paths() + solution_paths():
        nb = json.loads(path.read_text(encoding="utf-8"))
        first = next(c for c in nb["cells"] if c["cell_type"] == "code")   # after the title cell
        if "".join(first["source"]) != setup_cell_source():
            stale.append(path.name)
            if not check:
                first["source"] = setup_cell_source().splitlines(keepends=True)
                path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = re.sub(r"https://colab\.research\.google\.com/github/[^/]+/[^/]+/blob/[^/]+/notebooks/",
                 colab_url(""), text)
    if new != text:
        stale.append("README.md")
        if not check:
            readme.write_text(new, encoding="utf-8")
    return stale


if __name__ == "__main__":
    changed = sync(check="--check" in sys.argv)
    print("up to date" if not changed else "updated: " + ", ".join(changed))
