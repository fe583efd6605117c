"""Course conventions: every notebook is set up the same way, listed in the README, and clean."""
import json
import re

import pytest

from utils.course import ROOT, colab_url, notebook_paths, setup_cell_source, sync

NOTEBOOKS = notebook_paths()


def test_notebooks_are_numbered_in_order():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(1, len(numbers) + 1))


def test_the_setup_cell_is_short_and_finds_the_course_from_any_folder_inside_it(tmp_path, monkeypatch):
    source = setup_cell_source()
    assert len(source.splitlines()) <= 6
    for folder in (ROOT / "notebooks", ROOT / "figures"):
        monkeypatch.chdir(folder)
        namespace = {}
        exec(source, namespace)
        assert namespace["ROOT"] == ROOT and namespace["FIGURES"] == ROOT / "figures"
    monkeypatch.chdir(tmp_path)          # outside the course and not on Colab: say what to do, touch nothing
    path_before = list(__import__("sys").path)
    with pytest.raises(FileNotFoundError, match="course not found: clone .*, open this notebook inside it"):
        exec(source, {})
    assert __import__("sys").path == path_before       # no "None" put on sys.path


def test_setup_cells_and_readme_links_are_in_sync():
    assert sync(check=True) == [], "run `python -m utils.course` to regenerate them"


def test_every_notebook_is_in_the_readme_with_a_colab_badge():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("# ")
    first_commands = [line for line in readme.splitlines() if line.startswith("pip install")][:2]
    assert first_commands == ["pip install -r requirements.txt && jupyter lab notebooks/",
                              "pip install -r requirements.txt && pytest"]
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme, path.name
        assert colab_url(path.name) in readme, path.name


def test_readme_figures_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    figures = re.findall(r"\]\((figures/[^)]+\.png)\)", readme)
    assert figures
    for fig in figures:
        assert (ROOT / fig).is_file(), fig


def test_notebooks_are_executed_clean_and_portable():
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text(encoding="utf-8"))
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert "".join(code[0]["source"]) == setup_cell_source()
        counts = [c["execution_count"] for c in code]
        assert counts == list(range(1, len(code) + 1)), f"{path.name}: restart and run all before saving"
        assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"]), path.name
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"/(work|root|home|tmp|Users)/\w", text), f"{path.name}: absolute path"


def code_lines(source):
    """Lines of code in a cell: blank lines and comment-only lines do not count."""
    return [line for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_code_cells_are_short():
    """A learner reads a cell at a time: at most 40 lines of code each (split longer ones into steps)."""
    for path in [*NOTEBOOKS, SOLUTIONS]:
        nb = json.loads(path.read_text(encoding="utf-8"))
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                n = len(code_lines("".join(cell["source"])))
                assert n <= 40, f"{path.name}, cell {i}: {n} lines of code (at most 40)"


# What each notebook writes in its own cells and proves equal to utils before it imports utils'
# version ("from scratch"): none of these may come in with the notebook's first imports.
WRITTEN_BEFORE_IMPORTED = {
    "02": ["MultiHeadAttention"],
    "03": ["GPTModel", "LayerNorm", "GELU", "FeedForward", "TransformerBlock", "generate"],
    "04": ["train", "lr_at", "parameter_groups"],
    "05": ["MoEFeedForward", "load_balancing_loss", "router_z_loss", "capacity_keep_mask"],
    "06": ["TopKRouter", "fine_grained", "update_expert_biases", "sequence_balance_loss"],
    "07": ["LatentMoE", "moe_layer_costs"],
    "08": ["count_parameters", "as_published"],
    "09": ["KVCache"],
    "10": ["ExpertParallelMoE", "launch", "measure_exchange"],
    "11": ["RMSNorm", "apply_rope", "GroupedQueryAttention"],
    "12": ["quantize_fp8_blockwise", "dequantize_fp8_blockwise", "quantize_mxfp4", "dequantize_mxfp4"],
}


def _utils_imports(source):
    """Names a cell imports from utils: from utils.x import a, b as c -> {a, b}."""
    import ast
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("utils") for alias in node.names}


def test_notebooks_write_what_they_teach_before_importing_it():
    for path in NOTEBOOKS:
        code = ["".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                if c["cell_type"] == "code"]
        for name in WRITTEN_BEFORE_IMPORTED.get(path.name[:2], []):
            first = next((i for i, source in enumerate(code) if name in _utils_imports(source)), None)
            if first is None:
                continue                         # never imported: the notebook uses only its own
            assert first > 1, f"{path.name} imports {name} with its first imports, before writing it"
            assert any("assert" in source for source in code[2:first + 1]), \
                f"{path.name} imports {name} before any cell asserts anything"


def test_notebooks_never_import_transformers():
    """transformers is the tests' reference implementation; a learner's setup (Colab) does not have it."""
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text(encoding="utf-8"))
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert not re.search(r"^\s*(import|from)\s+transformers\b", code, re.MULTILINE), path.name


def test_training_notebooks_read_course_seed():
    for path in NOTEBOOKS:
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                         if c["cell_type"] == "code")
        if re.search(r"(?<!\.)\b(train|train_run)\(", code):   # train(...), not model.train()
            assert "course_seed()" in code, f"{path.name} trains but does not read COURSE_SEED"
            assert "manual_seed(123)" not in code and "seed=0)" not in code, path.name


SOLUTIONS = ROOT / "notebooks" / "solutions" / "exercise_solutions.ipynb"


def _markdown(path):
    return ["".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
            if c["cell_type"] == "markdown"]


def test_every_notebook_has_its_frame_and_exercises_with_solutions():
    solved = {re.match(r"## (\d\d) · ", text).group(1) for text in _markdown(SOLUTIONS) if re.match(r"## \d\d · ", text)}
    for path in NOTEBOOKS:
        text = "\n".join(_markdown(path))
        assert _markdown(path)[0].startswith(f"# {path.name[:2]} · "), path.name
        for part in ("**What you will learn:**", "**Prerequisites:**", "**Run time:**", "## Summary",
                     "## Exercises", "## Further reading"):
            assert part in text, f"{path.name}: no {part}"
        assert path.name[:2] in solved, f"{path.name}: no solutions in {SOLUTIONS.name}"
        assert "solutions/exercise_solutions.ipynb" in text


def test_the_course_cites_at_least_twelve_arxiv_papers():
    ids = set()
    for path in [*NOTEBOOKS, SOLUTIONS]:
        ids |= set(re.findall(r"arXiv (\d{4}\.\d{4,5})", "\n".join(_markdown(path))))
    assert len(ids) >= 12, sorted(ids)


def test_the_solutions_notebook_is_executed_clean_and_portable():
    nb = json.loads(SOLUTIONS.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "".join(code[0]["source"]) == setup_cell_source()
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"])
    assert not re.search(r"/(work|root|home|tmp|Users)/\w", SOLUTIONS.read_text(encoding="utf-8"))


def test_utils_modules_import_only_the_modules_listed_above_them():
    """utils/__init__.py lists every module; each imports only modules listed above it (no cycle,
    and the layout reads from config, to layers, models, training, analysis, serving, parallelism)."""
    import ast
    import re

    from utils.course import ROOT

    doc = ast.get_docstring(ast.parse((ROOT / "utils" / "__init__.py").read_text()))
    order = [name.strip() for line in doc.split("\n")[2:] if line and not line.startswith(" ")
             for name in re.split(r"\s{2,}", line.strip())[0].split(",")]
    modules = sorted(p.stem for p in (ROOT / "utils").glob("*.py") if p.stem != "__init__")
    assert sorted(order) == modules
    for module in modules:
        for node in ast.walk(ast.parse((ROOT / "utils" / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert order.index(node.module) < order.index(module), f"{module} imports {node.module}"
