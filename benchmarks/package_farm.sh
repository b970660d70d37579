# usage: bash benchmarks/package_farm.sh TREE FARM
# Makes `specserve.*` of the checkout at TREE importable from FARM (put FARM on PYTHONPATH) without installing:
# the device image may lack setuptools, and an A/B run imports an older tree beside this one.
tree=$(cd "$1" && pwd); farm=$2
rm -rf "$farm" && mkdir -p "$farm/specserve"
for f in "$tree"/specserve/*; do ln -s "$f" "$farm/specserve/"; done
for d in drafters kernels server; do ln -s "$tree/$d" "$farm/specserve/$d"; done
