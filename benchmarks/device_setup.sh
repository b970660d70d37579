# Source on the device machine from the repo root: makes `specserve.*` importable without installing
# (the GPU image has no network and may lack setuptools) and adds the carried wheels (msgspec, gguf).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/specserve
for f in "$PWD"/specserve/*; do ln -s "$f" /tmp/pkg/specserve/; done
ln -s "$PWD/drafters" /tmp/pkg/specserve/drafters
ln -s "$PWD/kernels" /tmp/pkg/specserve/kernels
ln -s "$PWD/server" /tmp/pkg/specserve/server
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
