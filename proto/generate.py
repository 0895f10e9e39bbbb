"""Generate the Python gRPC stubs in `service/gen/` from the .proto files in `proto/`.

    python proto/generate.py            # regenerate service/gen/
    python proto/generate.py --out DIR  # generate elsewhere (the tests compare with the committed copy)

The stubs are committed so that `pip install .` needs no code generator; a test regenerates them and
fails if they drift from the .proto files. protoc writes absolute imports (``from digits.v1 import``);
they are rewritten to ``service.gen.`` so that the stubs live inside our package, not at top level.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "service" / "gen"
PACKAGE = "service.gen"
# Protos whose symbols other libraries also put in protobuf's default descriptor pool (tritonclient and
# kserve ship their own `inference.*` stubs); a process cannot import two files defining one symbol into
# one pool, so these stubs get a pool of their own and both can be used side by side.
PRIVATE_POOL_PACKAGES = ("inference",)


def proto_files() -> list[Path]:
    """Every .proto below proto/, relative to it, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc (grpcio-tools) into `out`; returns the files written."""
    from grpc_tools import protoc  # dev dependency, only needed to regenerate

    out.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in proto_files()]
    args = [
        "protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed for {files}")
    top_level = {Path(f).parts[0] for f in files}
    written: list[Path] = []
    for path in sorted(out.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        for pkg in top_level:
            text = re.sub(rf"^from {pkg}(\.| import)", rf"from {PACKAGE}.{pkg}\1", text, flags=re.M)
        if path.name.endswith("_pb2.py") and path.relative_to(out).parts[0] in PRIVATE_POOL_PACKAGES:
            text = text.replace("_descriptor_pool.Default().AddSerializedFile(",
                                "_descriptor_pool.DescriptorPool().AddSerializedFile(")
        path.write_text(text)
        written.append(path)
    packages = {out}
    for path in written:
        packages.update(parent for parent in path.parents if out in parent.parents)
    for directory in sorted(packages):
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return sorted(written)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: service/gen)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
