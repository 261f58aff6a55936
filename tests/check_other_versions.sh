#!/usr/bin/env bash
# The trainers' tools at the versions CI does not install, each in a virtual environment on top of the installed
# requirements (needs the package registry):
#   webdataset 1.0.2: CI has 0.2.86, the newest that open_clip's [training] extra allows;
#   img2dataset 1.47, which needs pandas < 3 (datasets 5.2 brings 3), for README's recipe end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${TMPDIR:-/tmp}/synthetic-caption-versions
python3 -m venv --system-site-packages "$work/webdataset-1"
"$work/webdataset-1/bin/pip" install -q webdataset==1.0.2
"$work/webdataset-1/bin/python" -m pytest -q tests/test_training_loaders.py tests/test_multi_caption_datasets.py
python3 -m venv --system-site-packages "$work/img2dataset"
"$work/img2dataset/bin/pip" install -q img2dataset==1.47.0
PATH="$work/img2dataset/bin:$PATH" "$work/img2dataset/bin/python" -m pytest -q tests/test_img2dataset.py
