import pathlib
import sys

# Make `import utils` work from any working directory.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
