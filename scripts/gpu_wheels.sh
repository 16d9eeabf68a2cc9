#!/usr/bin/env bash
# Prepare, on a machine with PyPI, what scripts/gpu_check.sh needs on a GPU
# machine without one: .whl/worker-stack.tar.xz (infinity_env/gpu-stack-py312.txt,
# unpacked, pruned, xz-compressed) and .whl/main-stack.tar.xz (pyzmq + msgspec
# for the image's own numpy-2 Python). .whl/ is git-ignored; name it in the
# device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl/dl .whl/worker .whl/main
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
fetch() {
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$1" "${@:2}"
}
fetch .whl/dl -r infinity_env/gpu-stack-py312.txt
"$python" -m pip install -q --no-deps --no-compile --target .whl/worker .whl/dl/*.whl --python-version 3.12 \
  --implementation cp --only-binary=:all: "${platforms[@]}"
mkdir -p .whl/dl-main
fetch .whl/dl-main pyzmq==27.3.0 msgspec==0.22.0
"$python" -m pip install -q --no-deps --no-compile --target .whl/main .whl/dl-main/*.whl --python-version 3.12 \
  --implementation cp --only-binary=:all: "${platforms[@]}"
# Tests and caches are dead weight on the GPU machine.
for tree in .whl/worker .whl/main; do
  find "$tree" -depth \( -name tests -o -name __pycache__ \) -type d -exec rm -rf {} +
done
tar -C .whl/worker -cJf .whl/worker-stack.tar.xz .
tar -C .whl/main -cJf .whl/main-stack.tar.xz .
rm -rf .whl/dl .whl/dl-main .whl/worker .whl/main
du -sh .whl/*
