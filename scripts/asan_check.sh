#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the C extension.
#
# Builds fastqkv._ckernels with -fsanitize=address,undefined into a temporary
# copy of the source tree (the in-place build and the checkout are never
# touched), then runs the C test subset against that copy with libasan
# preloaded into Python.  Exits non-zero on any sanitizer report or test
# failure; exits 0 with a "skipped: ..." line when there is nothing to check
# (no csrc/, no C compiler, no sanitizer runtime, setup.py builds no extension).
#
#   bash scripts/asan_check.sh            # from anywhere
#   KEEP=1 bash scripts/asan_check.sh     # keep the temporary directory
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
CC_BIN="${CC:-gcc}"
START=$SECONDS

skip() { echo "asan_check: skipped: $*"; exit 0; }
fail() { echo "asan_check: FAILED: $*" >&2; exit 1; }

[ -d "$ROOT/csrc" ] || skip "no csrc/ directory (no C extension in this checkout)"
command -v "$CC_BIN" >/dev/null 2>&1 || skip "no C compiler ($CC_BIN not found)"
LIBASAN="$("$CC_BIN" -print-file-name=libasan.so 2>/dev/null)"
[ -n "$LIBASAN" ] && [ -e "$LIBASAN" ] || skip "$CC_BIN has no AddressSanitizer runtime (libasan.so)"
"$PY" -c "import numpy, setuptools, pytest" 2>/dev/null || skip "$PY lacks numpy, setuptools or pytest"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/fastqkv-asan.XXXXXX")"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$TMP"' EXIT
SRC="$TMP/src"
mkdir -p "$SRC"
# a copy of the sources, without compiled artefacts or caches
tar -C "$ROOT" --exclude='*.so' --exclude='__pycache__' --exclude='*.pyc' --exclude='build' \
    --exclude='.pytest_cache' --exclude='.hypothesis' --exclude='*.egg-info' \
    -cf - setup.py pyproject.toml README.md csrc fastqkv tests 2>/dev/null | tar -C "$SRC" -xf - \
    || fail "could not copy the source tree"

SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize=vptr"
echo "asan_check: building fastqkv._ckernels with $SAN"
(
    cd "$SRC" &&
    # -O1 last ($FASTQKV_CFLAGS): the sanitized -O3 build of the kernels took
    # minutes; -O1 builds in a fraction of that and checks the same code
    CFLAGS="$SAN -g -O1" LDFLAGS="$SAN" FASTQKV_CFLAGS="-O1" "$PY" setup.py -q build_ext --parallel 2 \
        --build-lib "$TMP/lib" --build-temp "$TMP/obj" >"$TMP/build.log" 2>&1
) || { tail -40 "$TMP/build.log"; fail "the sanitizer build failed"; }
SO="$(find "$TMP/lib" -name '_ckernels*.so' 2>/dev/null | head -1)"
if [ -z "$SO" ]; then
    if grep -q "building the C extension fastqkv._ckernels failed" "$TMP/build.log"; then
        tail -20 "$TMP/build.log"
        # the installed package (imported from outside the checkout) tells
        # whether the plain build works here at all
        plain="$(cd "$TMP" && "$PY" -c 'import fastqkv; print(fastqkv.backends()["c"].available)' 2>/dev/null)"
        [ "$plain" = "False" ] && skip "the C extension does not build here even without sanitizers"
        fail "setup.py could not build the extension with sanitizers"
    fi
    skip "setup.py builds no C extension yet"
fi
# (symbols read into a variable: grep -q closing a pipe early would fail under pipefail)
SYMS="$(nm -D "$SO" 2>/dev/null)"
grep -q __asan_report <<<"$SYMS" || fail "$SO is not instrumented by AddressSanitizer"
grep -q __ubsan_handle <<<"$SYMS" || fail "$SO is not instrumented by UBSan"
cp "$SO" "$SRC/fastqkv/" || fail "could not install the sanitized extension"

export LD_PRELOAD="$LIBASAN${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=99:log_path=$TMP/asan:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$TMP/ubsan:${UBSAN_OPTIONS:-}"
export FASTQKV_TEST_BACKENDS=c          # reliability suites: the c backend only
export PYTHONDONTWRITEBYTECODE=1
unset PYTHONPATH

cd "$SRC" || fail "no source copy"
"$PY" - <<'EOF' || fail "the sanitized extension is not the one imported, or the c backend is unavailable"
import fastqkv, fastqkv._c as c
info = fastqkv.backends()["c"]
assert info.available, info.reason
assert c._ckernels.__file__.startswith(__import__("os").getcwd()), c._ckernels.__file__
print("asan_check: c backend", info.reason, "from", c._ckernels.__file__)
EOF

TESTS=()
for t in tests/test_c_backend.py tests/test_c_serving.py tests/test_capi.py; do
    [ -f "$t" ] && TESTS+=("$t")
done
for t in tests/test_reliability_badinput.py tests/test_reliability_numerics.py \
         tests/test_reliability_concurrency.py tests/test_reliability_fuzz.py; do
    [ -f "$t" ] && TESTS+=("$t")
done
[ ${#TESTS[@]} -gt 0 ] || skip "no C test files found"

echo "asan_check: running ${TESTS[*]}"
# the tests' own budget, whatever the build took (keeps CI under 20 min)
BUDGET=420
timeout --signal=KILL "$BUDGET" "$PY" -m pytest -q -p no:cacheprovider -x \
    -k "not past_2gib and not gil_released and not million_key and not not_blocked and not merge_of_key_splits and not paged_and_varlen and not half_width" \
    "${TESTS[@]}"
RC=$?

REPORTS="$(ls "$TMP"/asan.* "$TMP"/ubsan.* 2>/dev/null)"
if [ -n "$REPORTS" ]; then
    for f in $REPORTS; do echo "=== $f"; head -60 "$f"; done
    fail "sanitizer reports above"
fi
[ "$RC" -eq 137 ] && fail "the test subset did not finish within ${BUDGET}s"
[ "$RC" -eq 0 ] || fail "pytest exited $RC under the sanitizers"
echo "asan_check: OK: no AddressSanitizer/UBSan report ($((SECONDS - START)) s)"
