# Source on the device machine from the repo root (`. benchmarks/device_setup.sh`): installs the carried wheels
# (.whl/) and makes specserve importable without installing it: a shim package in /tmp/shim maps
# specserve.drafters/kernels/server onto their folders as pyproject.toml does. Leaves the shell in /tmp/shim
# (so `python3 -m` finds the shim, not ./specserve) with R set to the repo root.
R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
rm -rf /tmp/shim/specserve && mkdir -p /tmp/shim && cp -r specserve /tmp/shim/
for d in drafters kernels server; do ln -sfn "$R/$d" "/tmp/shim/specserve/$d"; done
export PYTHONPATH=/tmp/shim:/tmp/site PYTHONUNBUFFERED=1
cd /tmp/shim || return
