#!/usr/bin/env bash
# Regenerate the Python stubs of proto/fedsplit.proto into src/fedsplit/wire/.
#
#   scripts/gen_proto.sh            # uses .venv/bin/python if present, else python3
#   PROTO_PYTHON=/path/to/python scripts/gen_proto.sh
#   OUT_DIR=/tmp/x scripts/gen_proto.sh   # write elsewhere (tests compare with the committed stubs)
#
# The stubs are committed; run this after every change to the .proto file.
# Needs grpcio-tools (the `dev` extra). The generated code checks at import
# time that the protobuf and grpcio runtimes are at least as new as the
# generator, so regenerate with the oldest versions you mean to support.
set -euo pipefail

# An OUT_DIR given relative to the caller's directory stays relative to it.
if [[ -n "${OUT_DIR:-}" ]]; then mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"; fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ -z "${PROTO_PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PROTO_PYTHON=.venv/bin/python; else PROTO_PYTHON=python3; fi
fi

out="${OUT_DIR:-src/fedsplit/wire}"
mkdir -p "$out"
"$PROTO_PYTHON" -m grpc_tools.protoc -Iproto \
    --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    proto/fedsplit.proto

# grpc_tools writes `import fedsplit_pb2 as fedsplit__pb2`, which only works
# when the output folder is on sys.path; make it a package-relative import.
sed -i.bak -E 's/^import fedsplit_pb2 as fedsplit__pb2$/from . import fedsplit_pb2 as fedsplit__pb2/' \
    "$out/fedsplit_pb2_grpc.py"
rm -f "$out/fedsplit_pb2_grpc.py.bak"

if ! grep -q '^from \. import fedsplit_pb2 as fedsplit__pb2$' "$out/fedsplit_pb2_grpc.py"; then
    echo "gen_proto.sh: could not rewrite the pb2 import in $out/fedsplit_pb2_grpc.py" >&2
    exit 1
fi
echo "regenerated fedsplit_pb2.py, fedsplit_pb2.pyi, fedsplit_pb2_grpc.py in $out"
