import sys
from pathlib import Path

# bench/ is not a package: make its shared helpers importable as `_common`.
sys.path.insert(0, str(Path(__file__).parent))
