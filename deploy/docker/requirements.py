"""Print ctrserve's requirements from pyproject.toml, one a line, for `pip install -r`.

The Dockerfile installs the dependencies from pyproject.toml alone, before it copies the
source, so that a code change does not reinstall them (layer caching). With no argument:
the base install (the scorer, no torch); `--extra NAME` prints that extra's requirements
instead; `--ort PACKAGE` replaces onnxruntime (for instance with onnxruntime-gpu: the two
must not be installed together, they ship the same module). A bare name keeps the version
range (`onnxruntime-gpu>=1.18`); a requirement with its own version (`onnxruntime-gpu==1.20.1`)
replaces it whole.

    python requirements.py [--extra train] [--ort onnxruntime-gpu] [--pyproject FILE]
"""

from __future__ import annotations

import argparse
import re
import tomllib

ONNXRUNTIME = re.compile(r"^onnxruntime(?![-\w.])")


def requirements(pyproject: dict, extra: str | None = None, ort: str = "onnxruntime"
                 ) -> list[str]:
    project = pyproject["project"]
    reqs = project["optional-dependencies"][extra] if extra else project["dependencies"]
    pinned = re.search(r"[<>=!~;@ \[]", ort) is not None
    return [(ort if pinned else ONNXRUNTIME.sub(ort, req)) if ONNXRUNTIME.match(req) else req
            for req in reqs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", default="pyproject.toml")
    parser.add_argument("--extra", help="an optional-dependencies group instead of the base")
    parser.add_argument("--ort", default="onnxruntime", help="the onnxruntime package")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        print("\n".join(requirements(tomllib.load(f), args.extra, args.ort)))


if __name__ == "__main__":
    main()
