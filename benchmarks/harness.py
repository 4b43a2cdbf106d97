"""The benchmark harness, run from a source checkout: ``python -m benchmarks.harness ...`` = ``acopt bench ...``.

The harness itself is acopt/bench.py, so that an installed acopt has it too;
its results and the commands that made them are in benchmarks/results/ and
docs/results.md.
"""

import sys

from acopt.bench import main

if __name__ == "__main__":
    sys.exit(main())
