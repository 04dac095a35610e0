"""dir(lorambo), which tab completion offers, holds the public API and nothing that looks like
it but is not: __all__, __version__, the documented subpackages once imported, and dunders.
The internal modules an import loads stay reachable for whoever imports them."""

import subprocess
import sys

CODE = """
import lorambo
import lorambo.integrations
shown = [n for n in dir(lorambo) if not n.startswith("__")]
print(sorted(set(shown) - set(lorambo.__all__)))
print(sorted(set(lorambo.__all__) - set(shown)), "__version__" in dir(lorambo))
print(all(hasattr(lorambo, n) for n in dir(lorambo)), lorambo.user_warnings.__name__, lorambo.ops.__name__)
"""


def test_dir_lists_the_public_api_only():
    # a fresh interpreter: what this test process imported would show up as attributes
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["['allocation', 'integrations', 'nn']", "[] True",
                                "True lorambo.user_warnings lorambo.ops"]
