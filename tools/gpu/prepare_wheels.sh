#!/usr/bin/env bash
# Fetch faiss-gpu and the CUDA 12 libraries it needs for the lent GPU machine (CPython 3.12,
# x86-64) and cut them into chunks that fit one device call each (64 MiB carry limit).
# Output: ignored folders .gw00/, .gw01/, ... each holding one 60 MiB piece of wheels.tar.
# See tools/gpu/README.md for the device calls that carry and reassemble them.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
work=.gpuwheels
grep -qxF "/.gw*/" .git/info/exclude 2>/dev/null || echo "/.gw*/" >> .git/info/exclude
grep -qxF "/$work/" .git/info/exclude || echo "/$work/" >> .git/info/exclude
rm -rf "$work" .gw[0-9]*
mkdir -p "$work/whl"
platforms=()
for n in 17 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d "$work/whl" \
  faiss-gpu==1.15.1 nvidia-cublas-cu12 nvidia-curand-cu12 nvidia-cuda-runtime-cu12
tar -C "$work" -cf "$work/wheels.tar" whl
sha256sum "$work/wheels.tar" | cut -d' ' -f1 > "$work/wheels.sha256"
split -b 60m -d -a 2 "$work/wheels.tar" "$work/part."
i=0
for part in "$work"/part.*; do
  dir=$(printf ".gw%02d" "$i")
  mkdir -p "$dir"
  mv "$part" "$dir/part"
  i=$((i + 1))
done
cp "$work/wheels.sha256" .gw00/
echo "$i chunks: $(ls -d .gw[0-9]* | tr '\n' ' ')"
