#!/usr/bin/env bash
# Instruction counts (callgrind Ir) of the C kernels for the fixed cases of
# scripts/callgrind_kernels.py, per ISA variant valgrind can run (it has no
# AVX-512), counting only fq_run and what it calls.
#
#   bash scripts/callgrind_kernels.sh                 # every case, generic and avx2
#   ISAS=avx2 CASES=decode-f32 bash scripts/callgrind_kernels.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
ISAS="${ISAS:-generic avx2}"
CASES="${CASES:-prefill-f32 decode-f32 decode-bf16}"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/fastqkv-callgrind.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT
command -v valgrind >/dev/null || { echo "valgrind not found (apt-get install -y valgrind)" >&2; exit 1; }

# this checkout's fastqkv, not an installed copy
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "fastqkv from $("$PY" -c 'import os, fastqkv; print(os.path.dirname(fastqkv.__file__))')"
printf '%-8s %-12s %16s\n' isa case Ir
for isa in $ISAS; do
  for c in $CASES; do
    f="$OUT/$isa-$c.out"
    (cd "$ROOT" && FASTQKV_ISA="$isa" valgrind --tool=callgrind --toggle-collect=fq_run \
        --callgrind-out-file="$f" "$PY" scripts/callgrind_kernels.py "$c" >/dev/null 2>"$f.log") \
      || { cat "$f.log" >&2; exit 1; }
    ir="$(sed -n 's/^summary: *//p' "$f")"
    printf '%-8s %-12s %16s\n' "$isa" "$c" "$ir"
  done
done
