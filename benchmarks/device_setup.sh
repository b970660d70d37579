# Source on the device machine from the repo root: makes `specserve.*` importable without installing
# (the GPU image has no network and may lack setuptools) and adds the carried wheels (msgspec, gguf).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
bash benchmarks/package_farm.sh "$PWD" /tmp/pkg
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
