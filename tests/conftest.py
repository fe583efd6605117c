import os
import pathlib
import sys

# Make `import utils` work from any working directory.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# Under pytest-xdist (see pytest.ini) several workers share the machine's cores: give each worker
# and the notebook kernels it starts (they inherit its environment) an equal share of the threads,
# instead of every worker using them all. Small models lose little with fewer threads, and
# oversubscribed cores would slow everything down and disturb the speed ratios the tests measure.
_workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
if _workers and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(_workers)))
    if "torch" in sys.modules:      # already imported (by a plugin): set it directly as well
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
