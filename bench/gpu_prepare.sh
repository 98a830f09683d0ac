#!/usr/bin/env bash
# Prepare what bench/gpu.sh needs on a GPU machine that has torch but no optuna / mlflow and no
# network: the Fashion-MNIST files in data/fashion-mnist/, and .whl/site.tar.xz, the packages it
# lacks unpacked from their wheels for its Python (3.12 by default). Both paths are git-ignored;
# carry them with the call. Run on a machine with pip access, from the repository root.
set -eu
PY=${PY:-3.12}
mkdir -p data/fashion-mnist .whl
cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
WHL=$(mktemp -d)
SITE=$(mktemp -d)
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
# shellcheck disable=SC2086
python3 -m pip download -q --only-binary=:all: --python-version "$PY" --implementation cp $plat -d "$WHL" \
  mlflow==3.17.2 optuna==5.0.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" $plat -d "$WHL" torch-pruning==1.6.1
# the GPU image already has these (and torch): leave them out so its own versions are used
skip='^(numpy|scipy|pandas|pyarrow|matplotlib|scikit_learn|pillow|fonttools|kiwisolver|contourpy|cycler|pyparsing|'
skip+='python_dateutil|six|joblib|threadpoolctl|narwhals|packaging|pyyaml|PyYAML|tqdm|requests|urllib3|idna|certifi|'
skip+='charset_normalizer|jinja2|markupsafe|werkzeug|click|cloudpickle|protobuf|typing_extensions|attrs|aiohttp|'
skip+='aiosignal|aiohappyeyeballs|frozenlist|multidict|yarl|propcache|anyio|h11|zipp|annotated_doc)-'
for f in "$WHL"/*.whl; do
  basename "$f" | grep -Eq "$skip" || unzip -q -o "$f" -d "$SITE"
done
rm -rf "$SITE/mlflow/server/js"  # the UI's JavaScript (27 MB): not needed to log runs
tar cJf .whl/site.tar.xz -C "$SITE" .
rm -rf "$WHL" "$SITE"
ls -la .whl/site.tar.xz data/fashion-mnist
