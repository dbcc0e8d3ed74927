#!/usr/bin/env bash
# A separate virtual environment for the OFFICIAL CFR-ICL evaluation (bench/official_eval.py), beside this
# project's own: what was run to make bench/results/parity/official/*.json.
#
#   bash bench/official_env.sh /work/official-venv
#   then a clone of the public repository TitorX/CFR-ICL-Interactive-Segmentation at the pinned commit
#   dadb0692c6612128f962a359610f4756866ac3dd (the one ../shared/reference/official was made with), e.g. in
#   /work/official/cfr-icl-official; nothing of it goes into this repository
#
# It shares torch with the system Python (--system-site-packages: the same torch 2.13.0+cpu build the project
# uses) and pins, inside the venv, the versions the official code needs where current ones break it: numpy 1.23
# (its requirements.txt; `np.int` in compute_noc_metric), albumentations 0.5.2 + imgaug 0.4.0 (imported by
# isegm.data), mmcv 1.7.2 built without ops (its ConvModule is in the model's head; 1.6.2 in requirements.txt
# does not build against torch 2), timm 0.6.13 (0.6.11 fails on Python 3.11). torchvision comes as PyPI's
# wheel, whose compiled ops need a CUDA torch: bench/official_eval.py explains the one-line workaround.
set -euo pipefail
VENV=${1:?usage: official_env.sh VENV_DIR}
python3 -m venv --system-site-packages "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q wheel
MMCV_WITH_OPS=0 "$PIP" install -q --no-build-isolation "mmcv==1.7.2"
"$PIP" install -q --no-deps "torchvision==0.28.0" "timm==0.6.13" "albumentations==0.5.2" "imgaug==0.4.0"
"$PIP" install -q easydict "einops==0.6.0" tqdm pyyaml tensorboard shapely imageio "scipy<1.14" \
    "scikit-image==0.22.0" "opencv-python-headless==4.10.0.84"
"$PIP" install -q "numpy==1.23.5"
"$VENV/bin/python" -c "import numpy, torch, cv2, mmcv; print('numpy', numpy.__version__, 'torch', torch.__version__, \
'opencv', cv2.__version__, 'mmcv', mmcv.__version__)"
