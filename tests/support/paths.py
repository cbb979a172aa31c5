"""Where the tests' files are: the repository, tests/ and its data, stubs and launch folders."""

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
SUPPORT = TESTS / "support"
DATA = TESTS / "data"
STUBS = TESTS / "stubs"
BENCH = TESTS / "bench"
LAUNCH = ROOT / "launch"
