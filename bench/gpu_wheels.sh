#!/usr/bin/env bash
# Wheels of hivemind and what it needs that the lent GPU machines lack (Python 3.12, x86-64), into .whl/
# (ignored by git), for bench/gpu.py's node sim there. Run here, where the package registries are reachable:
#     bash bench/gpu_wheels.sh
# then carry ".whl" in the device call and start its command with
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Versions are the ones this project tests with (the CI venv). Pure-Python packages published only as source
# are built into wheels here. numpy < 2.4 is carried because hivemind 1.1.12 breaks on 2.4 (docs/decisions.md).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform any)
BINARY=(hivemind==1.1.12 numpy==2.3.5 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pydantic==2.14.4
        pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 base58==2.1.1 ConfigArgParse==1.9.0
        netaddr==1.3.0 py-cid==0.5.0 py-multibase==2.0.0 py-multicodec==1.0.0 py-multihash==3.0.0 six==1.17.0
        mmh3==5.3.1 blake3==1.0.11 protobuf==7.36.2 safetensors==0.8.0)  # safetensors: node export / eval
SOURCE_ONLY=(prefetch_generator==1.0.3 varint==1.0.2 morphys==1.0 python-baseconv==1.2.2)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl "${SOURCE_ONLY[@]}"
du -sh .whl
