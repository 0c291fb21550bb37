"""Does this Python already have what requirements.txt asks for? Nothing is installed.

    python tools/check_env.py [--quiet]

Prints which Python and which torch it found, then exits 0 when every requirement is
installed at an allowed version, or 1 with one line naming what is missing or too old.
The Makefile uses it to run in an environment you already have (a Conda or virtual
environment, a cloud image with PyTorch) instead of creating .venv.
"""
import argparse
import os
import re
import sys
from importlib import metadata

REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "requirements.txt")


def requirements(path=REQUIREMENTS):
    """[(name, minimum version or None)] of the 'name>=version' lines (comments skipped)."""
    found = []
    for line in open(path):
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9.]+))?", line)
            if match is None:   # only ">=" is used there; anything else must be read by pip
                raise SystemExit(f"check_env.py: error: cannot read '{line}' in {path}")
            found.append(match.groups())
    return found


def release(version):
    """'2.14.1+cu130' -> (2, 14, 1): the numeric release, enough for '>=' of releases."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


# other distributions of the same import (OpenCV: the GUI and contrib builds import as cv2
# too, and an environment often has one of them already)
SAME_IMPORT = {"opencv-python-headless": ("opencv-python", "opencv-contrib-python",
                                          "opencv-contrib-python-headless")}


def installed_version(name):
    """The version of `name` or of a distribution that installs the same module; None."""
    for candidate in (name,) + SAME_IMPORT.get(name, ()):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            pass
    return None


def problems(reqs):
    """One 'name: what' for each requirement that is missing or older than allowed."""
    wrong = []
    for name, minimum in reqs:
        have = installed_version(name)
        if have is None:
            wrong.append(f"{name}: not installed")
            continue
        if minimum and release(have) < release(minimum):
            wrong.append(f"{name}: {have} installed, >= {minimum} needed")
    return wrong


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="print nothing, exit status only")
    args = parser.parse_args()
    wrong = problems(requirements())
    if not args.quiet:
        torch = f"torch {installed_version('torch') or 'not installed'}"
        print(f"=> environment: {sys.executable} (Python {sys.version.split()[0]}), {torch}")
        if wrong:
            print(f"check_env.py: error: this environment lacks {'; '.join(wrong)} "
                  f"(pip install -r requirements.txt)", file=sys.stderr)
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
