"""Where the repository's parts are, and code/ and tools/ put on sys.path, so that a tool
run from any directory imports the handout's modules, code/toolkit/ and the other tools.
Every tool run as a script imports it first: `import _paths`."""
import os
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
CODE = os.path.join(REPO, 'code')

for folder in (TOOLS, CODE):          # code/ ends up first, as main.py has it
    if folder not in sys.path:
        sys.path.insert(0, folder)
