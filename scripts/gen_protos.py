"""Generate the Python code for protos/*.proto into common/proto/.

The .proto files are the source of truth; the generated modules are committed so that
`pip install .` needs no code generator, and tests/test_protos_current.py fails when they
drift. Run `make protos` after editing a .proto file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "common" / "proto"


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    from grpc_tools import protoc  # dev dependency, only needed here

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for grpc_file in out_dir.glob("*_pb2_grpc.py"):
        # protoc emits absolute imports ("import fedmoe_pb2"); make them package-relative.
        text = grpc_file.read_text()
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        grpc_file.write_text(text)
    for path in out_dir.iterdir():
        if path.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")):
            written.append(path)
    return sorted(written)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for p in generate(out):
        print(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
