"""Pytest set-up: make the flat modules of code/ importable as the handout's scripts do."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(REPO, "code")
if CODE not in sys.path:
    sys.path.insert(0, CODE)
