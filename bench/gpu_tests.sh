#!/usr/bin/env bash
# The GPU-only tests of test_cifar100_resnet.py (and the CPU one that -k gpu also selects), on the device
# machine, which has torch but no pytest: pytest's wheels travel with the call and are unpacked there.
#   here, first:  python3 -m pip download -q --only-binary=:all: --python-version 3.12 -d .gpu1/wheels pytest
#   there:        bash bench/gpu_tests.sh .gpu1/wheels        (with .gpu1 in the call's carry)
# The log is also written to $OUT/gpu_tests.log. PYTHON picks the interpreter (default: python3).
set -uo pipefail
wheels=${1:?usage: bash bench/gpu_tests.sh WHEEL_FOLDER}
python=${PYTHON:-python3}
lib=$(mktemp -d)
"$python" - "$wheels" "$lib" <<'PY'
import pathlib, sys, zipfile
wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
if not any(w.name.startswith("pytest-") for w in wheels):
    sys.exit(f"error: no pytest wheel in {sys.argv[1]}")
for wheel in wheels:
    zipfile.ZipFile(wheel).extractall(sys.argv[2])
PY
[ $? -eq 0 ] || exit 2
cd "$(dirname "$0")/.."
PYTHONPATH="$lib" "$python" -c "import pytest, torch; print('pytest', pytest.__version__, 'from', pytest.__file__, \
'| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
PYTHONPATH="$lib" "$python" -m pytest -q -p no:cacheprovider -rs -k gpu test_cifar100_resnet.py 2>&1 \
    | tee "${OUT:-$lib}/gpu_tests.log"
