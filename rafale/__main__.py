"""`python -m rafale ...`"""

from rafale.cli import entry

entry()
