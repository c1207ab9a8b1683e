"""Generate the gRPC code in standbylib/rpc/v1 from proto/v1/*.proto, or check that it is current.

    python scripts/protogen.py          # regenerate
    python scripts/protogen.py --check  # exit 1, naming the files, when the committed code is stale

The generated modules are committed so that an installed package needs no code generator; the check
runs in `make test`, so a .proto change without regenerated code fails the build.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
PACKAGE = "standbylib/rpc"  # import path of the generated modules: standbylib.rpc.v1.<name>_pb2


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    sources = sorted(PROTO.glob("v1/*.proto"))
    args = [
        "protoc",
        f"-I{PACKAGE}={PROTO}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(f"{PROTO}/{s.relative_to(PROTO)}" for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    made = sorted(p.relative_to(out) for p in (out / PACKAGE).rglob("*") if p.is_file())
    return made


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        made = generate(Path(tmp))
        target = ROOT / PACKAGE / "v1"
        committed = {p.relative_to(ROOT) for p in target.glob("*_pb2*")}
        if args.check:
            stale = [
                str(m)
                for m in made
                if not (ROOT / m).exists() or not filecmp.cmp(Path(tmp) / m, ROOT / m, False)
            ]
            stale += [str(c) for c in committed - set(made)]
            if stale:
                print("generated gRPC code is stale: " + ", ".join(sorted(stale)), file=sys.stderr)
                print("run: python scripts/protogen.py", file=sys.stderr)
                return 1
            return 0
        for c in committed - set(made):
            (ROOT / c).unlink()
        for m in made:
            (ROOT / m).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / m, ROOT / m)
        init = target / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC and protobuf modules (scripts/protogen.py); do not edit."""\n')
        print(f"generated {len(made)} files in {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
