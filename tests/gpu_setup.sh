#!/usr/bin/env bash
# Run HERE, before `python tests/bench.py gpu` goes to a bare GPU host through the device tool (no network there).
# It puts the wheels such a host lacks into .whl/ (TinyVLA's own TRL and datasets versions, PyAV, websockets, and
# liger-kernel for bench.py's Liger training variant: its RMSNorm/SwiGLU/RoPE kernels, as TRL >= 1.15 keeps its own
# fused LM head + cross-entropy and turns Liger's off; it needs the host's triton) and
# the real Qwen2.5-VL-3B config and LIBERO metadata into .assets/, both ignored by git and carried by the call (about 48 MB).
# The device call then carries [".whl", ".assets"] and runs BENCHMARKS.md's command.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")" && touch "$exclude"
for d in /.whl/ /.assets/; do grep -qx "$d" "$exclude" || echo "$d" >> "$exclude"; done
py=.venv/bin/python  # the versions tested here (README's install); a bare python3 may lack TRL
[ -x $py ] || py=python3
version() { $py -c "import importlib.metadata as m; print(m.version('$1'))"; }
new=$(mktemp -d)  # the old carry is replaced only once the new one is complete
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$new/.whl" \
  "trl==$(version trl)" "datasets==$(version datasets)" "dill==$(version dill)" "multiprocess==$(version multiprocess)" \
  "fsspec==$(version fsspec)" av websockets liger-kernel  # fsspec: datasets caps it; websockets: --serve there
cp -r ../shared/assets "$new/.assets" && chmod -R u+w "$new/.assets"
rm -rf .whl .assets && mv "$new/.whl" "$new/.assets" . && rmdir "$new"
du -sh .whl .assets
